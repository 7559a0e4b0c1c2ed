"""Importance sampling of whole sequences for a small causal language model.

A tiny decoder-only transformer (built from a config, nothing downloaded) learns the
bytes of the Python standard library's own source files; the held-out test files are
every tenth file. The last layer and the loss are ``fastis.linear_cross_entropy`` over the
``[B, T, D]`` hidden states (the output layer tied to the embedding); with
``--method importance`` a ``fastis.ImportanceSampler`` draws whole sequences by the
per-sequence score that ``linear_cross_entropy(..., return_score=True)`` returns, with the
weights ``1 / (B g)`` per sequence. The pieces live in ``fastis.demo.lm``.

    python examples/lm_sequence_importance.py --method importance --budget 60
    python examples/lm_sequence_importance.py --method uniform --steps 500 --lr 3e-3
"""

import argparse
import math
import time

import torch

from fastis.demo.lm import LMConfig, LMRun, eval_subset, load_corpus


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=("uniform", "importance"), default="importance")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, help="training steps")
    group.add_argument("--budget", type=float, help="seconds of training (default 60)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--presample-size", type=int, default=None, help="default 3 x batch")
    p.add_argument("--tau-th", type=float, default=None, help="the switch (default: paper's)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="corpus size")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--every", type=float, default=5.0, help="seconds between progress lines")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    corpus = load_corpus(args.seq_len, args.max_bytes).to(device)
    print(
        f"corpus: {len(corpus.train_files)} train files ({len(corpus.x_train)} sequences), "
        f"{len(corpus.test_files)} test files ({len(corpus.x_test)} sequences) of "
        f"{args.seq_len} bytes; device {device}"
    )
    budget = math.inf if args.steps is not None else (args.budget or 60.0)
    run = LMRun(
        args.method,
        corpus,
        budget,
        args.lr,
        seed=args.seed,
        batch_size=args.batch_size,
        model_cfg=LMConfig(seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers),
        max_steps=args.steps,
        presample_size=args.presample_size,
        tau_th=args.tau_th,
    )
    held_in = eval_subset(len(corpus.x_train)).to(device)
    params = sum(p.numel() for p in run.model.parameters())
    print(f"model: {params} parameters; method {args.method}, lr {args.lr}, seed {args.seed}")
    start = time.perf_counter()
    while not run.done:
        run.advance(args.every)
        r = run.record()
        print(
            f"step {r['steps']:6d}  {r['seconds']:7.1f} s  loss {run.last_loss:.3f}  "
            f"{r['ms_per_step']:.1f} ms/step  importance steps {r['importance_fraction']:.0%}",
            flush=True,
        )
    result = {**run.record(), **run.evaluate(held_in)}
    print(
        f"done in {time.perf_counter() - start:.1f} s: train loss {result['train_loss']:.4f}, "
        f"test loss {result['test_loss']:.4f} nats/byte"
    )
    return result


if __name__ == "__main__":
    main()
