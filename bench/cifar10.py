"""The end-to-end benchmark's CIFAR-10 setting: the data set (read locally) and ResNet-18.

``python -m bench.e2e --cifar DIR`` reads CIFAR-10 from a directory holding the standard
python-format batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``), when the user
has them; nothing is downloaded.
"""

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn


def load(root):
    """CIFAR-10 from its python-format batches in ``root``.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 ``[n, 3, 32, 32]`` normalised per
        channel with the training set's statistics, int64 labels.
    """
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names + ["test_batch"] if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not a CIFAR-10 python-format directory: missing {', '.join(missing)}"
        )

    def read(name):
        with open(root / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return torch.from_numpy(x).float() / 255, torch.tensor(batch[b"labels"]).long()

    parts = [read(n) for n in names]
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    x_test, y_test = read("test_batch")
    mean = x_train.mean((0, 2, 3), keepdim=True)
    std = x_train.std((0, 2, 3), keepdim=True)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32 x 32 images (3 x 3 stem, no max-pool), as in most CIFAR papers:
    ``[N, 3, 32, 32]`` -> logits ``[N, num_classes]``."""

    def __init__(self, num_classes=10, width=64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))
