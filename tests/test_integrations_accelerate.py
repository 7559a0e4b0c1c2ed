"""fastis.integrations.accelerate: the documented recipe on one process (the weights reach
the gradient, save_state / load_state continue the exact index stream), and a sampler
sharded a second time is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

accelerate = pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("one_thread")

import fastis  # noqa: E402
from fastis.integrations import ImportanceDataLoader, weighted_step  # noqa: E402
from fastis.integrations.accelerate import check_prepared, prepare_loader  # noqa: E402

N, D, C, B = 60, 5, 3, 6


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g)
    x[:10] *= 4.0
    return TensorDataset(x, torch.randint(0, C, (N,), generator=g))


def setup(**sampler_kwargs):
    """The recipe up to the loop: accelerator, sampler, loader, checkpointing, prepare."""
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, C)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_set = data()
    sampler = fastis.ImportanceSampler(len(train_set), B, seed=5, **sampler_kwargs)
    loader = ImportanceDataLoader(train_set, batch_sampler=sampler)
    accelerator.register_for_checkpointing(loader)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, sampler, prepare_loader(accelerator, loader)


def run(accelerator, model, optimizer, sampler, loader, steps, *, check=None, save=None):
    """The recipe's loop; returns the data set indices trained on at each step."""
    seen = []
    select = sampler.select
    selected = []

    def recording(m, x, y):  # test instrumentation: what select returned
        out = select(m, x, y)
        selected.append(out)
        return out

    sampler.select = recording
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = weighted_step(sampler, model, x, y)
            accelerator.backward(loss)
            if check is not None:
                check(model, *selected[-1])
            optimizer.step()
            optimizer.zero_grad()
        seen.append(sampler.last_indices.tolist())
        if save is not None and len(seen) == save[0]:
            accelerator.save_state(save[1])
        if len(seen) == steps:
            break
    return seen, selected


def test_recipe_weights_reach_the_gradient():
    checked = []

    def check(model, x, y, w):
        weight = model.weight.detach().double().requires_grad_()
        bias = model.bias.detach().double().requires_grad_()
        rows = torch.nn.functional.cross_entropy(x.double() @ weight.T + bias, y, reduction="none")
        (rows * w.double()).mean().backward()
        torch.testing.assert_close(model.weight.grad.double(), weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.bias.grad.double(), bias.grad, rtol=1e-5, atol=1e-6)
        checked.append(not torch.all(w == 1))

    parts = setup(tau_th=-1.0)
    _, selected = run(*parts, 4, check=check)
    assert len(checked) == 4 and all(checked)
    assert all(len(x) == B for x, _, _ in selected)


def test_save_state_resume_continues_the_stream(tmp_path):
    """Uninterrupted: 14 steps (10 per epoch), save_state after step 4 (a batch already
    prefetched by Accelerate's loader); a fresh setup that load_state's it trains on the
    indices of steps 5.. exactly."""
    kwargs = {"tau_th": 0.9, "a_tau": 0.5}
    full, _ = run(*setup(**kwargs), 14, save=(4, tmp_path / "state"))
    accelerator, *rest = setup(**kwargs)
    accelerator.load_state(tmp_path / "state")
    resumed, selected = run(accelerator, *rest, 10)
    assert resumed == full[4:]
    assert any(len(x) != len(w) or not torch.all(w == 1) for x, _, w in selected)


def test_sharding_twice_is_refused():
    sampler = fastis.ImportanceSampler(N, B, seed=0)
    loader = ImportanceDataLoader(data(), batch_sampler=sampler)
    # what accelerator.prepare(loader) builds on 2 processes
    sharded = accelerate.data_loader.prepare_data_loader(loader, num_processes=2, process_index=0)
    with pytest.raises(ValueError, match="BatchSamplerShard that wraps a fastis sampler"):
        check_prepared(sharded)
    accelerator = accelerate.Accelerator(cpu=True)
    with pytest.raises(ValueError, match="BatchSamplerShard"):
        prepare_loader(accelerator, sharded)
    # on one process accelerator.prepare leaves the sampler alone
    assert check_prepared(accelerator.prepare(loader), accelerator).batch_sampler is sampler


def test_sampler_for_other_ranks_is_refused():
    accelerator = accelerate.Accelerator(cpu=True)
    sampler = fastis.HistorySampler(N, B, num_replicas=2, rank=1, seed=0)
    loader = ImportanceDataLoader(data(), batch_sampler=sampler)
    with pytest.raises(ValueError, match="rank 1 of 2 but this is process 0 of 1"):
        prepare_loader(accelerator, loader)


def test_loss_fn_must_be_per_example():
    sampler = fastis.ImportanceSampler(N, B, seed=0, tau_th=-1.0)
    model = torch.nn.Linear(D, C)
    x, y = data().tensors
    (idx,) = [next(iter(sampler))]
    with pytest.raises(ValueError, match=r"per-example losses of shape \[6\]"):
        weighted_step(sampler, model, x[idx], y[idx], loss_fn=lambda o, t: (o - 0).pow(2).mean())


def test_fastis_imports_no_framework():
    code = (
        "import sys, fastis, fastis.integrations; "
        "print(sorted(m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
import test_integrations_accelerate as t


out, kw = sys.argv[1], {"tau_th": 0.9, "a_tau": 0.5}
parts = t.setup(**kw)
full, _ = t.run(*parts, 8, save=(3, f"{out}/state"))
accelerator, *rest = t.setup(**kw)
accelerator.load_state(f"{out}/state")
resumed, _ = t.run(accelerator, *rest, 5)
stats = rest[2].stats()
with open(f"{out}/rank{accelerator.process_index}.json", "w") as f:
    json.dump({"full": full, "resumed": resumed, "on": stats["steps_importance"]}, f)
"""


def test_two_processes_with_torchrun(tmp_path):
    """torchrun, 2 CPU processes (gloo): disjoint shards at every step, the ranks switch
    together, and save_state / load_state resume both ranks' streams exactly."""
    script = tmp_path / "acc_ddp.py"
    script.write_text(DDP_SCRIPT)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(tests.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(
        [*cmd, str(tmp_path), str(tests)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for a, b in zip(ranks[0]["full"], ranks[1]["full"], strict=True):
        assert not set(a) & set(b)
    assert ranks[0]["on"] == ranks[1]["on"] > 0
    for r in ranks:
        assert r["resumed"] == r["full"][3:]
