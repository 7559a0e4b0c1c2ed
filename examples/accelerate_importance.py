"""Importance sampling in an Accelerate loop: the sampler shards itself, so the loader is
placed on the device with ``prepare_loader``, not wrapped by ``accelerator.prepare``.

    pip install 'fastis[accelerate]' && python examples/accelerate_importance.py
    # or on two processes: accelerate launch --num_processes 2 examples/accelerate_importance.py

A small MLP on synthetic blobs for a few epochs; prints the sampler's statistics.
"""

import torch
from accelerate import Accelerator
from torch.utils.data import TensorDataset

import fastis
from fastis.integrations import ImportanceDataLoader, weighted_step
from fastis.integrations.accelerate import prepare_loader


def blobs(n=4096, d=16, classes=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, d, generator=g), y)


def main():
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    train_set = blobs()
    # after Accelerator(): the sampler reads the ranks from the process group
    sampler = fastis.ImportanceSampler(len(train_set), batch_size=64, seed=0)
    loader = ImportanceDataLoader(train_set, batch_sampler=sampler)
    accelerator.register_for_checkpointing(loader)  # sampler state in save_state/load_state
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = prepare_loader(accelerator, loader)  # not accelerator.prepare(loader)
    for _ in range(3):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = weighted_step(sampler, model, x, y)  # select, weighted loss, update
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
    if accelerator.is_main_process:
        print({k: v for k, v in sampler.stats().items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
