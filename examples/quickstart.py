"""A short training run that scores every example with ``fastis.score`` as it trains.

A small MLP learns a synthetic 20-class problem; each step logs the spread of the
per-sample scores as ``tau = sqrt(n * sum g^2) / sum g`` (1 for equal scores), the quantity
that decides whether importance sampling would pay (the README's "Training with importance
sampling").
Runs in seconds on a CPU: ``python examples/quickstart.py``.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import fastis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    n, d, classes = 8192, 32, 20
    centers = torch.randn(classes, d, generator=g) * 0.45
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    x, y = x.to(args.device), y.to(args.device)

    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(d, 128), torch.nn.ReLU(), torch.nn.Linear(128, classes)
    ).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, n, (128,), generator=g).to(args.device)
        logits = model(x[idx])
        loss = F.cross_entropy(logits, y[idx])
        scores = fastis.score(logits, y[idx])  # no gradient, one pass over the logits
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            tau = (scores.square().sum() * len(scores)).sqrt() / scores.sum()
            print(
                f"step {step:4d}  loss {loss.item():.4f}  score mean {scores.mean():.4f}  "
                f"max {scores.max():.4f}  tau {tau:.2f}"
            )
    with torch.no_grad():
        full = fastis.score(model(x), y)
    top = full.sort().values[-n // 100 :].sum() / full.sum()
    print(
        f"done in {time.perf_counter() - start:.1f} s; training-set scores: mean "
        f"{full.mean():.4f}, the top 1% of examples hold {top:.0%} of the total"
    )


if __name__ == "__main__":
    main()
