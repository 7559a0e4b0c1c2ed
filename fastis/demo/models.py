"""The demo's network: a small 1-D CNN for MNIST-1D (40 samples per example, 10 classes)."""

import torch
from torch import nn


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
        # He initialisation: with torch's default (smaller) weights, SGD sits on the
        # chance-level plateau for a random number of seconds, which drowns the comparison
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, 40]`` -> logits ``[N, 10]``."""
        return self.classifier(self.features(x.unsqueeze(1)))
