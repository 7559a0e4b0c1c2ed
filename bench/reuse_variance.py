r"""Amortised scoring on the demo model: gradient variance and wall-clock per step against
``k`` draws per scored presample, and the history sampler's stable mode.

    python -m bench.reuse_variance                      # the default run (~4 min, 1 thread)
    python -m bench.reuse_variance --checkpoints 100 --pool 512 --mc-steps 32   # a quick look

The demo's CNN on MNIST-1D trains by uniform SGD (the demo's rate 0.1, momentum 0.9,
``b = 128``); at each checkpoint (after ``--checkpoints`` steps) the model is frozen and a
uniform pool of ``M = --pool`` training examples stands for the data set. Its exact
per-example gradients ``G`` ``[M, P]`` (``torch.func``: ``vmap`` of ``grad``) give the true
gradient ``gbar = mean_i G_i`` and the exact variance of a uniform batch of ``b`` (with
replacement), ``V_u = (mean_i |G_i|^2 - |gbar|^2) / b``. Each method then runs its own
protocol on the pool (``select`` / ``update`` with the frozen model's scores) for
``--mc-steps`` steps; step ``t``'s estimate is ``e_t = (1/b) sum_r w_r G_{i_r}`` with the
weights ``select`` returned, and the table gives

- ``var/step (MC)``: ``mean_t |e_t - gbar|^2 / V_u``, one step's variance against
  uniform's, with its standard error;
- ``var/step (exact)``, history samplers only: the variance of each step given the table
  that drew it, exact from ``G`` and the table's probabilities, averaged over the steps
  (their Monte Carlo has a heavy tail: rare draws of weight up to ``1 / mix``);
- ``var/k steps``: ``mean_c |mean_{t in c} e_t - gbar|^2 / (V_u / k)`` over the cycles ``c``
  of ``k`` steps that share a presample: the noise of the ``k`` steps together against
  ``k`` uniform steps (a shared presample's own noise does not average out over its ``k``
  steps; for the history samplers, ``k = 1`` and the exact value);
- ``ms/step``: one full training step on the whole training set (``select``, forward,
  weighted loss, backward, SGD step, ``update``), each method on its own copy of the model,
  timed in interleaved slices on one intra-op thread (``bench._timing.interleaved_ms``);
- ``var x time``: ``var/k steps`` times ``ms/step`` over uniform's: the noise left at equal
  wall-clock (< 1: the method reduces the noise per second of training).

The history samplers' scores come from the training run itself: over the last ``--history``
steps before the checkpoint a history sampler over the pool draws a batch every step and
takes the scores that the current model's training forward gives those rows, as a run
training on its draws would (the model's trajectory stays uniform's, the same for every
method). So at the checkpoint its scores are up to that many steps old, and the Monte
Carlo (one pass of the pool, ``M / b`` steps, by default) measures what those stale scores
cost. ``history-stable`` forgets scores older than ``--max-staleness`` steps (default one
pass of the pool); ``history`` never does; each at the sampler's default uniform share
(``mix=0.1``, weights <= 10) and at the demo's (``mix=0.5``, weights <= 2).

The pool is a finite population: a presample of ``B`` drawn from it without replacement has
its own noise scaled by ``(M - B) / (M - 1)`` (0.83 for ``B = 1024`` in the default pool
of 6144, against 0.97 in the full training set), so the shared-presample cost of ``k > 1``
is slightly understated for the largest presample.

Writes ``bench/results/<--name>.md``.
"""

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import fastis
from bench._timing import interleaved_ms, malloc_label, pin_glibc_malloc
from fastis.demo import data as demo_data
from fastis.demo import report
from fastis.demo.models import MNIST1DCNN

LR, MOMENTUM = 0.1, 0.9  # the demo's uniform rate (step schedule) and momentum


def forever(sampler):
    while True:
        yield from sampler


def per_sample_grads(model, x, y, chunk=512) -> torch.Tensor:
    """float32 ``[M, P]``: the gradient of each example's cross-entropy, flattened."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    one = vmap(grad(loss), in_dims=(None, 0, 0))
    rows = []
    for i in range(0, len(x), chunk):
        d = one(params, x[i : i + chunk], y[i : i + chunk])
        rows.append(torch.cat([d[k].flatten(1) for k in params], 1))
    return torch.cat(rows)


# -- the samplers of the comparison -------------------------------------------------------


def make_sampler(kind, n, args, seed):
    """``kind``: ``('is', B, k)``, ``('history', L or None, uniform_mix)``."""
    b = args.batch_size
    if kind[0] == "is":
        _, big_b, k = kind
        return fastis.ImportanceSampler(
            n, b, presample_size=big_b, draws_per_presample=k, tau_th=-1.0, seed=seed
        )
    return fastis.HistorySampler(
        n,
        b,
        rebuild_every=args.rebuild_every,
        max_staleness=kind[1],
        uniform_mix=kind[2],
        seed=seed,
    )


def label(kind):
    if kind[0] == "is":
        return f"upper-bound B={kind[1]} k={kind[2]}"
    name = "history" if kind[1] is None else f"history-stable L={kind[1]}"
    return f"{name} mix={kind[2]}"


def protocol_step(sampler, it, model, x, y):
    """One ``select`` / ``update`` with the frozen model; the drawn rows and weights."""
    idx = torch.as_tensor(next(it))
    xb, yb, w = sampler.select(
        model if isinstance(sampler, fastis.ImportanceSampler) else None, x[idx], y[idx]
    )
    with torch.no_grad():
        _, g = fastis.cross_entropy(model(xb), yb, sample_weight=w, return_score=True)
    sampler.update(g)
    return sampler.last_indices, w


def monte_carlo(sampler, it, model, x, y, grads, gbar, steps, k, sq_norms=None):
    """``(mean_t |e_t - gbar|^2, its standard error, mean_c |mean_c e - gbar|^2, exact)``.

    ``exact`` (a history sampler, given ``sq_norms = |G_i|^2``): the mean over the steps of
    the variance of the step given the table that drew it, ``(1/b) ((1/M^2) sum_i |G_i|^2
    / p_i - |gbar|^2)``, free of the Monte Carlo's heavy tail (rare draws of weight up to
    ``1 / mix``); else None."""
    errs, exact = [], []
    m, b = len(grads), sampler.batch_size
    for _ in range(steps):
        sel, w = protocol_step(sampler, it, model, x, y)
        errs.append((w.double()[:, None] * grads[sel].double()).mean(0) - gbar)
        if sq_norms is not None:
            # the table that drew this batch (rebuilt only when the next batch is drawn)
            p = sampler._table.probs.double()
            exact.append(((sq_norms / p).sum() / m**2 - (gbar * gbar).sum()) / b)
    e = torch.stack(errs)
    sq = (e * e).sum(1)
    cycles = e[: steps - steps % k].reshape(-1, k, e.shape[1]).mean(1)
    return (
        float(sq.mean()),
        float(sq.std() / math.sqrt(steps)),
        float((cycles**2).sum(1).mean()),
        float(torch.stack(exact).mean()) if exact else None,
    )


# -- wall-clock ---------------------------------------------------------------------------


def step_fns(model, x, y, kinds, args):
    """A full training step per method, each on its own copy of ``model``."""
    b = args.batch_size
    fns = {}

    def sgd(net):
        return torch.optim.SGD(net.parameters(), lr=LR / 10, momentum=MOMENTUM)

    def uniform():
        net = copy.deepcopy(model)
        opt, gen = sgd(net), torch.Generator().manual_seed(1)

        def step():
            idx = torch.randint(0, len(x), (b,), generator=gen)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def sampled(kind):
        net = copy.deepcopy(model)
        opt = sgd(net)
        s = make_sampler(kind, len(x), args, seed=1)
        it = forever(s)
        is_importance = kind[0] == "is"

        def step():
            idx = torch.as_tensor(next(it))
            xb, yb, w = s.select(net if is_importance else None, x[idx], y[idx])
            loss, g = fastis.cross_entropy(net(xb), yb, sample_weight=w, return_score=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            s.update(g)

        return step

    fns["uniform"] = uniform()
    for kind in kinds:
        fns[label(kind)] = sampled(kind)
    return fns


# -- the run ------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=40_000, help="MNIST-1D size")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[300, 1500, 3000])
    p.add_argument("--pool", type=int, default=6144, help="M, the pool standing for the data")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--presamples", type=int, nargs="+", default=None, help="default 3b and 8b")
    p.add_argument("--draws", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--mc-steps", type=int, default=256, help="Monte-Carlo steps per method")
    p.add_argument("--history", type=int, default=None, help="steps (default 4 pool passes)")
    p.add_argument("--max-staleness", type=int, default=None, help="default one pool pass")
    p.add_argument("--rebuild-every", type=int, default=10)
    p.add_argument("--time-calls", type=int, default=60, help="timed steps per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="reuse_variance_cpu")
    args = p.parse_args(argv)
    pinned = pin_glibc_malloc()
    torch.set_num_threads(1)
    b = args.batch_size
    per_pass = -(-args.pool // b)
    presamples = args.presamples or [3 * b, 8 * b]
    history = args.history if args.history is not None else 4 * per_pass
    max_staleness = args.max_staleness or max(per_pass, 2 * args.rebuild_every - 1)
    kinds = [("is", big_b, k) for big_b in presamples for k in args.draws]
    # the sampler's default uniform share, and the demo's (fastis.demo.config)
    hist_kinds = [("history", L, mix) for mix in (0.1, 0.5) for L in (max_staleness, None)]
    kinds += hist_kinds
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    x, y, _, _ = demo_data.mnist1d(args.num_samples)
    gen = torch.Generator().manual_seed(args.seed)
    pool = torch.randperm(len(x), generator=gen)[: args.pool]
    px, py = x[pool], y[pool]
    model = MNIST1DCNN()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    # the history samplers, fed along the uniform run (see the module docstring)
    hist = {kind: make_sampler(kind, args.pool, args, args.seed) for kind in hist_kinds}
    hist_it = {kind: forever(s) for kind, s in hist.items()}

    rows, done = [], 0
    for ckpt in sorted(args.checkpoints):
        while done < ckpt:
            if done >= ckpt - history:
                for kind, s in hist.items():
                    protocol_step(s, hist_it[kind], model, px, py)
            idx = torch.randint(0, len(x), (b,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
        frozen = copy.deepcopy(model)
        grads = per_sample_grads(frozen, px, py)  # float32; sums in float64
        gbar = grads.sum(0, dtype=torch.float64) / len(grads)
        sq_norms = grads.pow(2).sum(1, dtype=torch.float64)
        sq_mean = float(sq_norms.mean())
        v_u = (sq_mean - float((gbar * gbar).sum())) / b
        with torch.no_grad():
            train_loss = float(F.cross_entropy(frozen(px), py))
        for kind in kinds:
            if kind[0] == "is":
                s = make_sampler(kind, args.pool, args, args.seed + 1)
                it, k, steps = forever(s), kind[2], args.mc_steps
            else:  # the history built along the run, a copy per checkpoint
                s, k, steps = copy.deepcopy(hist[kind]), 1, min(args.mc_steps, per_pass)
                it = forever(s)
            norms = sq_norms if kind[0] == "history" else None
            mse, se, kmse, exact = monte_carlo(s, it, frozen, px, py, grads, gbar, steps, k, norms)
            row = {
                "checkpoint": ckpt,
                "method": label(kind),
                "train_loss": train_loss,
                "var_step": mse / v_u,
                "var_step_se": se / v_u,
                # the history samplers: the exact conditional variance (see monte_carlo)
                "var_k": kmse / (v_u / k) if exact is None else exact / v_u,
                "var_exact": None if exact is None else exact / v_u,
                "k": k,
                "steps": steps,
            }
            if kind[0] == "history":  # at the checkpoint, before the Monte Carlo
                row["stale_fraction"] = hist[kind].stats()["stale_fraction"]
            rows.append(row)
        print(f"checkpoint {ckpt}: loss {train_loss:.3f}", flush=True)

    times = interleaved_ms(step_fns(model, x, y, kinds, args), args.time_calls, "cpu")
    base = times["uniform"]
    for row in rows:
        row["ms"] = times[row["method"]]
        row["var_time"] = row["var_k"] * row["ms"] / base
    elapsed = time.perf_counter() - started
    text = render(args, rows, times, pinned, history, max_staleness, elapsed, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return {"rows": rows, "times": times}


def render(args, rows, times, pinned, history, max_staleness, elapsed, argv):
    m = report.machine()
    argv = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python -m bench.reuse_variance", *argv])
    lines = [
        "# Amortised scoring: gradient variance and time per step against k",
        "",
        f"{time.strftime('%Y-%m-%d')}; {m.get('cpu', m['processor'])}, {m.get('cores', '?')}"
        f" cores (shared); torch {m['torch']}; 1 intra-op thread; glibc malloc: "
        f"{malloc_label(pinned)}; {elapsed:.0f} s in all.",
        "",
        f"Command: `{cmd}`",
        "",
        f"Demo CNN on MNIST-1D ({args.num_samples} examples), uniform SGD warm-up (lr {LR}, "
        f"momentum {MOMENTUM}, b = {args.batch_size}); pool M = {args.pool}; "
        f"{args.mc_steps} Monte-Carlo steps per upper-bound method, one pool pass for the "
        f"history samplers, whose scores were taken along the last {history} steps; "
        f"history-stable: max_staleness = {max_staleness}, rebuild_every = "
        f"{args.rebuild_every}. Variances relative to a uniform batch of b (1 = uniform); "
        "var/k steps: the k steps that share a presample together, against k uniform "
        "steps; var x time: var/k steps x ms/step over uniform's (< 1: less noise at equal "
        "wall-clock). Presamples come from the pool without replacement, which scales their "
        "own noise by (M - B) / (M - 1). See the docstring of bench/reuse_variance.py for "
        "the definitions.",
        "",
        f"Time per training step (ms, median of interleaved slices): uniform "
        f"{times['uniform']:.2f}.",
        "",
    ]
    for ckpt in sorted({r["checkpoint"] for r in rows}):
        sub = [r for r in rows if r["checkpoint"] == ckpt]
        lines += [
            f"## After {ckpt} uniform steps (pool loss {sub[0]['train_loss']:.3f})",
            "",
            "| method | var/step (MC) | var/step (exact) | var/k steps | ms/step "
            "| x uniform time | var x time |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sub:
            name = r["method"]
            if "stale_fraction" in r:
                name += f" (stale {r['stale_fraction']:.0%})"
            lines.append(
                f"| {name} | {r['var_step']:.3f} ± {r['var_step_se']:.3f} | "
                f"{'' if r['var_exact'] is None else format(r['var_exact'], '.3f')} | "
                f"{r['var_k']:.3f} | {r['ms']:.2f} | {r['ms'] / times['uniform']:.2f} | "
                f"{r['var_time']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
