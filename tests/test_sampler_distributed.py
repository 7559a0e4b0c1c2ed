"""Two gloo processes on the CPU: the ranks switch together (the fixed threshold, and the
measured switch with presample reuse) and draw disjoint shards."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastis.sampling import HistorySampler, ImportanceSampler, MeasuredSwitch, compute_tau

WORLD = 2
N, B_SMALL, STEPS = 200, 8, 60


def example_scores(rank: int) -> torch.Tensor:
    """Per-example scores as each rank sees them: skewed on rank 0 (u^60), equal on rank 1,
    so only the average across ranks decides the switch."""
    u = torch.rand(N, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return u**60 if rank == 0 else torch.ones(N, dtype=torch.float64)


# the measured switch: importance steps are cheap on rank 0 and dear on rank 1, so the
# ranks disagree on their own ratios; both decide from their mean
MEASURED_COSTS = [
    {"uniform": 1.0, "presample": 2.0, "reuse": 1.0},
    {"uniform": 1.0, "presample": 12.0, "reuse": 1.0},
]
M_B, M_BIG, M_K, M_STEPS = 16, 96, 2, 60


def measured_run(rank: int) -> dict:
    """A measured switch with 2 draws per presample, each rank's fake clock advancing by
    its own costs; logs the kind of every step and the last decision."""
    u = torch.rand(N, generator=torch.Generator().manual_seed(20 + rank), dtype=torch.float64)
    scores = u**100
    clock = [0.0]
    sw = MeasuredSwitch(clock=lambda: clock[0], min_steps=2)
    s = ImportanceSampler(
        N,
        M_B,
        presample_size=M_BIG,
        seed=5,
        score_fn=lambda o, t: o[:, 0],
        switch=sw,
        draws_per_presample=M_K,
    )
    kinds = []
    it = iter(s)
    for _ in range(M_STEPS):
        try:
            idx = next(it)
        except StopIteration:
            it = iter(s)
            idx = next(it)
        before = s.presamples
        s.select(lambda t: t, scores[idx][:, None], None)
        s.update(scores[s.last_indices])
        kind = "uniform" if len(idx) == M_B else "presample" if s.presamples > before else "reuse"
        clock[0] += MEASURED_COSTS[rank][kind]
        kinds.append(kind)
    return {"kinds": kinds, "last": s.stats()["switch"], "own": sw.cost_ratio(M_B, M_BIG, M_K)}


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
        log["measured"] = measured_run(rank)
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


def test_ranks_switch_together_on_their_mean_measured_cost(logs):
    a, b = (log["measured"] for log in logs)
    assert a["kinds"] == b["kinds"]
    kinds = a["kinds"]
    first = kinds.index("presample")
    assert kinds[first + 1] == "reuse" and kinds[-1] == "uniform"  # on, then off together
    # rank 0 alone would stay on (a cycle costs (2 + 1) / 2 = 1.5), rank 1 alone would turn
    # off sooner (6.5); the ranks used their mean, 4, bit for bit the same
    assert (a["own"], b["own"]) == pytest.approx((1.5, 6.5))
    decision = ("tau", "variance_reduction", "noise_share", "benefit", "cost_ratio")
    assert [a["last"][k] for k in decision] == [b["last"][k] for k in decision]
    assert a["last"]["seconds_presample"] != b["last"]["seconds_presample"]  # own clocks
    assert a["last"]["cost_ratio"] == pytest.approx(4.0)
    assert a["last"]["benefit"] < 4.0
