"""GPU check section: ``fastis.cross_entropy`` forward + backward with the score.

Per shape and dtype, for each provider of ``bench/providers.py`` (fastis, fastis in place,
torch with an eager score, Liger where installed): the median time, GB/s counting one read
of the logits and one write of their gradient, the fraction of the copy bandwidth, and the
peak memory beyond the inputs in logits-sized buffers. A cheap part captures a whole
training step (forward, ``fastis.cross_entropy``, backward, SGD) in one CUDA graph.
"""

import torch

import fastis
from bench._section import Part, Settings, table
from bench._timing import bench_ms, capture, describe
from bench.providers import cross_entropy_providers, inputs
from bench.shapes import DTYPES, FULL, QUICK


def _peak_extra(once, inplace_bytes):
    """Bytes a call allocates beyond what was allocated before it (CUDA only)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    once()
    torch.cuda.synchronize()
    # the copy handed to the in-place variant is its input, not extra
    return torch.cuda.max_memory_allocated() - base - inplace_bytes


def measure(settings: Settings) -> list[dict]:
    device = settings.device
    providers = cross_entropy_providers(device)
    rows = []
    for dtype in DTYPES:
        for N, C in QUICK if settings.quick else FULL:
            leaf, target, weight = inputs(N, C, dtype, device)
            leaf.requires_grad_(True)
            logits_bytes = leaf.numel() * leaf.element_size()
            row = {
                "N": N,
                "C": C,
                "shape": f"{N} x {C}",
                "dtype": str(dtype).removeprefix("torch."),
                "bytes": 2 * logits_bytes,  # one read of the logits, one write of the grad
            }
            clone_ms = bench_ms(lambda leaf=leaf: leaf.clone(), device)
            for name, step in providers.items():
                inplace = name == "fastis_inplace"

                def once(step=step, inplace=inplace, leaf=leaf, target=target, weight=weight):
                    leaf.grad = None
                    step(leaf.clone() if inplace else leaf, target, weight)

                try:
                    # the in-place variant needs a fresh copy each time: its cost is removed
                    row[f"{name}_ms"] = bench_ms(once, device) - (clone_ms if inplace else 0)
                    if torch.device(device).type == "cuda":
                        leaf.grad = None
                        extra = _peak_extra(once, inplace * logits_bytes)
                        row[f"{name}_peak_extra_logits"] = extra / logits_bytes
                except Exception as exc:  # a baseline out of memory must not end the run
                    row[f"{name}_ms"] = None
                    row[f"{name}_error"] = describe(exc, 120)
            for name in providers:
                if row.get(f"{name}_ms"):
                    row[f"{name}_GBps"] = row["bytes"] / row[f"{name}_ms"] / 1e6
                    row[f"{name}_of_copy"] = row[f"{name}_GBps"] / settings.bandwidth
            rows.append(row)
            leaf.grad = None
            del leaf, target, weight
    return rows


def markdown(rows: list[dict]) -> list[str]:
    names = [k[:-3] for k in rows[0] if k.endswith("_ms")] if rows else []
    columns = [("N x C", "shape", "s"), ("dtype", "dtype", "s")]
    for n in names:
        columns += [
            (f"{n} ms", f"{n}_ms", ".4f"),
            ("GB/s", f"{n}_GBps", ".0f"),
            ("of copy", f"{n}_of_copy", ".0%"),
            ("peak", f"{n}_peak_extra_logits", ".2f"),
        ]
    return [
        "## fastis.cross_entropy (forward + backward, with the score)",
        "",
        "GB/s count one read of the logits and one write of the gradient; peak is "
        "the extra memory in logits-sized buffers.",
        "",
        *table(rows, columns),
    ]


def training_step(settings: Settings) -> dict:
    """Forward, ``fastis.cross_entropy``, backward and an SGD step in one CUDA graph."""
    device = settings.device
    if torch.device(device).type != "cuda":
        return {"cuda_graph": "skipped: needs CUDA"}
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1000)
        ).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(512, 64, device=device)
        y = torch.randint(0, 1000, (512,), device=device)
        w = torch.rand(512, device=device)

        def step():
            opt.zero_grad(set_to_none=False)
            loss, score = fastis.cross_entropy(model(x), y, sample_weight=w, return_score=True)
            loss.backward()
            opt.step()
            return loss, score

        graph, (loss, score) = capture(step, warmup=3)
        before = [p.detach().clone() for p in model.parameters()]
        graph.replay()
        torch.cuda.synchronize()
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        return {
            "cuda_graph": f"captured; replay updated the parameters: {moved}; "
            f"loss {loss.item():.4f}, finite scores: {bool(score.isfinite().all())}"
        }
    except Exception as exc:
        return {"cuda_graph": f"failed: {describe(exc, 300)}"}


def training_step_markdown(out: dict) -> list[str]:
    return ["Training step in a CUDA graph: " + out["cuda_graph"]]


PARTS = [
    Part("cross_entropy", measure, markdown),
    Part("training_step", training_step, training_step_markdown, cheap=True),
]
