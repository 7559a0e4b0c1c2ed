"""The networks of the workloads (``fastis.demo.config.WORKLOADS``).

- ``'demo'``: ``MNIST1DCNN``, a small 1-D CNN for MNIST-1D (40 samples, 10 classes).
- ``'wide-cnn'``: ``WideCNN1D``, a wider and deeper 1-D CNN for the same data, whose step
  is compute-bound (tens of ms at ``b = 128`` on one core of a 2020s server CPU).
- ``'tabular-mlp'``: ``TabularMLP``, a two-hidden-layer MLP for the generated table of
  ``fastis.demo.data.tabular``.

All use He initialisation and no normalisation layers (a batch-norm layer would make the
presample's scoring forward depend on its batch and update the running statistics).
"""

import torch
from torch import nn

from fastis.demo.data import TABULAR_CLASSES, TABULAR_FEATURES


def _he_init(module: nn.Module) -> None:
    # with torch's default (smaller) weights, SGD sits on the chance-level plateau for a
    # random number of seconds, which drowns the comparison
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


class MNIST1DCNN(nn.Module):
    """Three 1-D convolutions (the last two stride 2) and a linear classifier."""

    def __init__(self, channels: int = 32, num_classes: int = 10, length: int = 40):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(channels * ((length + 3) // 4), num_classes)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, 40]`` -> logits ``[N, 10]``."""
        return self.classifier(self.features(x.unsqueeze(1)))


class WideCNN1D(nn.Module):
    """Five 1-D convolutions of ``channels`` (kernel 5, then 3, 3 stride 2, 3, 3 stride 2)
    and a two-layer classifier (``hidden`` units): 216k parameters at the defaults against
    the demo CNN's 9.6k, about 0.3 GFLOP a forward of 128 rows."""

    def __init__(
        self, channels: int = 64, hidden: int = 256, num_classes: int = 10, length: int = 40
    ):
        super().__init__()
        layers = [nn.Conv1d(1, channels, 5, padding=2), nn.ReLU()]
        for stride in (1, 2, 1, 2):
            layers += [nn.Conv1d(channels, channels, 3, stride=stride, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(channels * ((length + 3) // 4), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, length]`` -> logits ``[N, num_classes]``."""
        return self.classifier(self.features(x.unsqueeze(1)))


class TabularMLP(nn.Module):
    """``in_features -> hidden -> hidden -> num_classes`` with ReLUs (75k parameters at
    the defaults)."""

    def __init__(
        self,
        in_features: int = TABULAR_FEATURES,
        hidden: int = 256,
        num_classes: int = TABULAR_CLASSES,
    ):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, in_features]`` -> logits ``[N, num_classes]``."""
        return self.net(x)


_MODELS = {"demo": MNIST1DCNN, "wide-cnn": WideCNN1D, "tabular-mlp": TabularMLP}


def build(workload: str = "demo") -> nn.Module:
    """A fresh network of ``workload`` (at its defaults); draws from torch's global
    generator, so seed it first."""
    if workload not in _MODELS:
        raise ValueError(f"unknown workload {workload!r}; choose from {tuple(_MODELS)}")
    return _MODELS[workload]()
