"""Two gloo processes on the CPU: the ranks switch together and draw disjoint shards."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastis.sampling import HistorySampler, ImportanceSampler, compute_tau

WORLD = 2
N, B_SMALL, STEPS = 200, 8, 60


def example_scores(rank: int) -> torch.Tensor:
    """Per-example scores as each rank sees them: skewed on rank 0 (u^60), equal on rank 1,
    so only the average across ranks decides the switch."""
    u = torch.rand(N, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return u**60 if rank == 0 else torch.ones(N, dtype=torch.float64)


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        scores = example_scores(rank)
        # tau_new is about 2.8 on rank 0 and 1 on rank 1: their mean crosses 1.5, not 2
        s = ImportanceSampler(N, B_SMALL, tau_th=1.5, score_fn=lambda o, t: o[:, 0])
        log = {"seed": s.seed, "steps": []}
        it = iter(s)
        for _ in range(STEPS):
            try:
                idx = next(it)
            except StopIteration:
                it = iter(s)
                idx = next(it)
            active = len(idx) == s.presample_size
            _, _, w = s.select(lambda t: t, scores[idx][:, None], None)
            trained = scores[s.last_indices]
            s.update(trained)
            local = compute_tau(scores[idx] if active else trained)
            log["steps"].append(
                {"idx": idx, "active": active, "tau": s.tau, "local_tau_new": float(local)}
            )
        h = HistorySampler(N, B_SMALL, seed=3)
        drawn = set()
        for idx in h:
            drawn.update(idx)
            h.select(None, torch.zeros(B_SMALL, 1), None)
            h.update(torch.rand(B_SMALL))
        log["history_drawn"] = drawn
        log["history_len"] = len(h)
        torch.save(log, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(f"file://{tmp}/init", str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_switch_together(logs):
    a, b = (log["steps"] for log in logs)
    assert logs[0]["seed"] == logs[1]["seed"]  # rank 0's seed was broadcast
    assert [s["active"] for s in a] == [s["active"] for s in b]
    assert [s["tau"] for s in a] == [s["tau"] for s in b]  # bitwise
    modes = [s["active"] for s in a]
    assert any(modes) and not all(modes), "the run should switch on"
    # tau follows the recursion on the mean of the ranks' tau_new
    tau = 0.0
    for sa, sb in zip(a, b, strict=True):
        tau = 0.9 * tau + 0.1 * (sa["local_tau_new"] + sb["local_tau_new"]) / 2
        assert sa["tau"] == pytest.approx(tau, rel=1e-12)
    # rank 0 alone would have switched earlier (its scores are skewed), rank 1 never
    assert max(s["local_tau_new"] for s in b) == pytest.approx(1.0)


def test_ranks_draw_disjoint_shards(logs):
    a, b = (log["steps"] for log in logs)
    for sa, sb in zip(a, b, strict=True):
        assert not set(sa["idx"]) & set(sb["idx"])
    # the batches of the first pass (those that fit in N / 2 positions; a batch never
    # straddles two passes) hold distinct examples, across steps and ranks
    firsts = []
    for steps in (a, b):
        used = 0
        for s in steps:
            used += len(s["idx"])
            if used > N // WORLD:
                break
            firsts.extend(s["idx"])
    assert len(firsts) >= N * 3 // 4 and len(set(firsts)) == len(firsts)


def test_history_sampler_shards(logs):
    owned = [set(range(r, N, WORLD)) for r in range(WORLD)]
    for r, log in enumerate(logs):
        assert log["history_drawn"] <= owned[r]
        assert log["history_len"] == N // WORLD // B_SMALL + (N // WORLD % B_SMALL > 0)
