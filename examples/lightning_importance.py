"""Importance sampling in a PyTorch Lightning fit: the diff against a plain LightningModule.

    pip install 'fastis[lightning]' && python examples/lightning_importance.py

A small MLP on synthetic blobs, on the CPU, for a few seconds; prints the sampler's
statistics. The lines marked ``# fastis`` are all that changes from a plain module.
"""

import lightning as L
import torch
from torch.utils.data import TensorDataset

import fastis
from fastis.integrations.lightning import (  # fastis
    ImportanceDataLoader,
    ImportanceSampling,
    importance_loss,
)


def blobs(n=4096, d=16, classes=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, d, generator=g), y)


class Classifier(L.LightningModule):
    def __init__(self, train_set):
        super().__init__()
        self.train_set = train_set
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
        )

    def forward(self, x):
        return self.net(x)

    def train_dataloader(self):
        sampler = fastis.ImportanceSampler(len(self.train_set), batch_size=64, seed=0)  # fastis
        return ImportanceDataLoader(self.train_set, batch_sampler=sampler)  # fastis

    def training_step(self, batch, batch_idx):
        x, y = batch
        return importance_loss(self, x, y)  # fastis: select, weighted loss, update

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main():
    torch.manual_seed(0)
    model = Classifier(blobs())
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        use_distributed_sampler=False,  # fastis: the sampler shards itself
        callbacks=[ImportanceSampling()],  # fastis: checks and logs tau, share, weights
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model)
    sampler = trainer.train_dataloader.batch_sampler
    print({k: v for k, v in sampler.stats().items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
