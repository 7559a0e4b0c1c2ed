"""fastis.integrations.lightning: a real Lightning Trainer on the CPU trains a tiny softmax
regression with importance sampling; the weights reach the gradient, the switch turns on
and is logged, a checkpoint resume continues the exact index stream, misuse raises."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

L = pytest.importorskip("lightning")

pytestmark = pytest.mark.usefixtures("one_thread")

import fastis  # noqa: E402
from fastis.integrations import sampler_of  # noqa: E402
from fastis.integrations.lightning import (  # noqa: E402
    ImportanceDataLoader,
    ImportanceSampling,
    importance_loss,
)

N, D, C, B = 96, 6, 4, 8


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    x[: N // 6] *= 4.0  # a few far-away points: scores that differ
    return TensorDataset(x, torch.randint(0, C, (N,), generator=g))


class Classifier(L.LightningModule):
    """A working module with the few changed lines: the loader, the loss."""

    def __init__(self, sampler_kwargs=None, loss_fn=None, sampler_cls=fastis.ImportanceSampler):
        super().__init__()
        self.sampler_cls = sampler_cls
        torch.manual_seed(0)
        self.net = torch.nn.Linear(D, C)
        self.train_set = data()
        self.sampler_kwargs = {"seed": 3, **(sampler_kwargs or {})}
        self.loss_fn = loss_fn
        self.seen = []  # (step, data set indices trained on)
        self.selected = []  # (x, y, w) that select returned, per step

    def forward(self, x):
        return self.net(x)

    def train_dataloader(self):
        sampler = self.sampler_cls(len(self.train_set), B, **self.sampler_kwargs)
        select = sampler.select

        def recording_select(model, x, y):  # test instrumentation: what select returned
            out = select(model, x, y)
            self.selected.append(out)
            return out

        sampler.select = recording_select
        return ImportanceDataLoader(self.train_set, batch_sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = importance_loss(self, x, y, loss_fn=self.loss_fn)
        sampler = sampler_of(self.trainer.train_dataloader)
        self.seen.append((self.global_step, sampler.last_indices.tolist()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def trainer(tmp_path, max_steps, **kwargs):
    kwargs.setdefault("callbacks", [ImportanceSampling(log_every_n_steps=1)])
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(
            isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in kwargs["callbacks"]
        ),
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


class GradCheck(L.Callback):
    """After each backward: the gradient equals the float64 gradient of the weighted
    loss mean_i w_i CE(W x_i + c, y_i) on the rows and weights select returned."""

    def __init__(self):
        self.checked = 0
        self.importance_checked = 0

    def on_after_backward(self, trainer, module):
        x, y, w = module.selected[-1]
        weight = module.net.weight.detach().double().requires_grad_()
        bias = module.net.bias.detach().double().requires_grad_()
        rows = torch.nn.functional.cross_entropy(x.double() @ weight.T + bias, y, reduction="none")
        (rows * w.double()).mean().backward()
        torch.testing.assert_close(
            module.net.weight.grad.double(), weight.grad, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(module.net.bias.grad.double(), bias.grad, rtol=1e-5, atol=1e-6)
        self.checked += 1
        self.importance_checked += int(not torch.all(w == 1))


def test_weights_reach_the_gradient(tmp_path):
    module = Classifier({"tau_th": -1.0})  # importance sampling from the first step
    check = GradCheck()
    trainer(tmp_path, 4, callbacks=[ImportanceSampling(), check]).fit(module)
    assert check.checked == 4
    assert check.importance_checked == 4  # non-unit weights: the check can see them dropped


def test_switch_turns_on_and_is_logged(tmp_path):
    module = Classifier({"tau_th": 0.9, "a_tau": 0.5})  # tau = c (1 - 0.5^t), c >= 1
    t = trainer(tmp_path, 8)
    t.fit(module)
    modes = [len(x) != len(w) or not torch.all(w == 1) for x, _, w in module.selected]
    assert not modes[0] and any(modes)  # starts uniform, switches on
    first_on = modes.index(True)
    assert all(modes[first_on:])  # and stays on (tau > 1 > tau_th once on)
    metrics = t.callback_metrics
    assert 0.0 < float(metrics["fastis/importance_share"]) < 1.0
    assert float(metrics["fastis/tau"]) > 0.9
    assert torch.isfinite(metrics["fastis/mean_weight"])


RESUMED = {
    # the switch turns on before the checkpoint
    "importance": (fastis.ImportanceSampler, {"tau_th": 0.9, "a_tau": 0.5}),
    # tables rebuilt from the recorded scores every 3 batches
    "history": (fastis.HistorySampler, {"rebuild_every": 3}),
}


@pytest.mark.parametrize("kind", sorted(RESUMED))
def test_resume_continues_the_index_stream(tmp_path, kind):
    """An uninterrupted run saves a checkpoint at step 5 (mid-epoch, a batch prefetched);
    a new run resumed from it trains on exactly the indices of steps 6.. of the first."""
    cls, kwargs = RESUMED[kind]
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1
    )
    full = Classifier(kwargs, sampler_cls=cls)
    trainer(tmp_path, 16, callbacks=[ImportanceSampling(), ckpt]).fit(full)
    path = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    assert path.exists(), os.listdir(tmp_path / "ckpt")

    resumed = Classifier(kwargs, sampler_cls=cls)
    trainer(tmp_path, 16).fit(resumed, ckpt_path=path)
    assert [s for s, _ in resumed.seen] == list(range(5, 16))
    assert resumed.seen == full.seen[5:]
    assert any(len(x) != len(w) or not torch.all(w == 1) for x, _, w in resumed.selected)
    # the runs also crossed an epoch (12 batches per epoch) and agree on the weights
    torch.testing.assert_close(resumed.net.weight, full.net.weight)


# -- misuse --------------------------------------------------------------------------


def test_scalar_loss_is_refused(tmp_path):
    def mean_loss(out, y):
        return torch.nn.functional.cross_entropy(out, y)  # reduced: cannot be weighted

    with pytest.raises(ValueError, match=r"per-example losses of shape \[8\]"):
        trainer(tmp_path, 2).fit(Classifier(loss_fn=mean_loss))


def test_per_example_loss_fn_trains(tmp_path):
    def rows(out, y):
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    module = Classifier({"tau_th": -1.0}, loss_fn=rows)
    check = GradCheck()
    trainer(tmp_path, 3, callbacks=[ImportanceSampling(), check]).fit(module)
    assert check.importance_checked == 3


def test_sampler_for_other_ranks_is_refused(tmp_path):
    class Wrong(Classifier):
        def train_dataloader(self):
            sampler = fastis.HistorySampler(len(self.train_set), B, num_replicas=2, rank=0, seed=0)
            return ImportanceDataLoader(self.train_set, batch_sampler=sampler)

    with pytest.raises(ValueError, match="num_replicas=2 but the trainer runs 1"):
        trainer(tmp_path, 2).fit(Wrong())


def test_wrapped_sampler_is_refused(tmp_path):
    class Wrapped(Classifier):
        def train_dataloader(self):
            sampler = fastis.ImportanceSampler(len(self.train_set), B, seed=0)
            return DataLoader(self.train_set, batch_sampler=BatchSampler(sampler, 2, False))

    with pytest.raises(ValueError, match="BatchSampler that wraps a fastis sampler"):
        trainer(tmp_path, 2).fit(Wrapped())


def test_distributed_sampler_injection_is_refused():
    fake = SimpleNamespace(
        world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True)
    )
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        ImportanceSampling().setup(fake, None, "fit")
    fake._accelerator_connector.use_distributed_sampler = False
    ImportanceSampling().setup(fake, None, "fit")


def test_loader_refuses_batch_options():
    sampler = fastis.ImportanceSampler(N, B, seed=0)
    with pytest.raises(ValueError, match="shuffle=True does not apply"):
        ImportanceDataLoader(data(), batch_sampler=sampler, shuffle=True)
    with pytest.raises(TypeError, match="batch_sampler must be a fastis sampler"):
        ImportanceDataLoader(data(), batch_sampler=BatchSampler(range(N), B, False))


# -- two processes (gloo) through Lightning's ddp strategy ------------------------------

DDP_SCRIPT = """
import json, sys, torch
import lightning as L
from torch.utils.data import TensorDataset
import fastis
from fastis.integrations import sampler_of
from fastis.integrations.lightning import ImportanceDataLoader, ImportanceSampling, importance_loss


torch.set_num_threads(1)

class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(6, 4)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 6, generator=g)
        x[:16] *= 4.0
        self.data = TensorDataset(x, torch.randint(0, 4, (96,), generator=g))
        self.seen, self.modes = [], []

    def forward(self, x):
        return self.net(x)

    def train_dataloader(self):
        s = fastis.ImportanceSampler(len(self.data), 8, tau_th=0.9, a_tau=0.5, seed=1)
        return ImportanceDataLoader(self.data, batch_sampler=s)

    def training_step(self, batch, i):
        loss = importance_loss(self, *batch)
        s = sampler_of(self.trainer.train_dataloader)
        self.seen.append(s.last_indices.tolist())
        self.modes.append(s.steps_importance)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

m = M()
t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
              enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, use_distributed_sampler=False,
              default_root_dir=sys.argv[1], callbacks=[ImportanceSampling()])
t.fit(m)
with open(f"{sys.argv[1]}/rank{t.global_rank}.json", "w") as f:
    json.dump({"seen": m.seen, "modes": m.modes}, f)
"""


def test_ddp_two_processes(tmp_path):
    """Lightning's ddp strategy on 2 CPU processes (gloo): the ranks switch at the same
    step and train on disjoint examples at every step."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["modes"] == ranks[1]["modes"]  # switched together
    assert ranks[0]["modes"][-1] > 0  # and did switch on
    for a, b in zip(ranks[0]["seen"], ranks[1]["seen"], strict=True):
        assert not set(a) & set(b)  # disjoint shards at every step
