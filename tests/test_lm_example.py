"""The sequence importance sampling demo (``fastis.demo.lm``): data, model, unbiasedness."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from fastis.demo import lm

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops

TINY = lm.LMConfig(seq_len=8, d_model=16, n_layers=2, n_heads=2)


@pytest.fixture
def source_dir(tmp_path):
    """A fake library of 25 files of different contents (and one non-.py file)."""
    for i in range(25):
        (tmp_path / f"m{i:02d}.py").write_text(f"# module {i}\n" + "x = 1\n" * (i + 3))
    (tmp_path / "README.txt").write_text("not python")
    return tmp_path


def test_split_is_by_file_and_deterministic(source_dir):
    files = lm.stdlib_files(root=source_dir)
    assert [f.name for f in files] == [f"m{i:02d}.py" for i in range(25)]
    train, test = lm.split_files(files, test_every=10)
    assert [f.name for f in test] == ["m09.py", "m19.py"]
    assert not set(train) & set(test) and len(train) + len(test) == 25
    a, b = lm.load_corpus(8, root=source_dir), lm.load_corpus(8, root=source_dir)
    assert a.test_files == ["m09.py", "m19.py"] and b.train_files == a.train_files
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    # the test sequences are exactly the held-out files' bytes, the targets shifted by one
    held_out = (source_dir / "m09.py").read_bytes() + (source_dir / "m19.py").read_bytes()
    n = (len(held_out) - 1) // 8
    assert lm.decode(a.x_test.flatten()) == held_out[: 8 * n].decode()
    assert torch.equal(a.y_test.flatten()[:-1], a.x_test.flatten()[1:])
    assert a.x_train.dtype == torch.int64 and int(a.x_train.max()) < lm.VOCAB


def test_byte_budget_and_real_stdlib():
    small = lm.stdlib_files(max_bytes=50_000)
    assert sum(f.stat().st_size for f in small) <= 50_000 or len(small) == 1
    assert small == sorted(small) and all(f.suffix == ".py" for f in small)
    assert lm.stdlib_files(max_bytes=50_000) == small
    assert lm.decode(lm.encode("déjà\n")) == "déjà\n"


def test_split_files_rejects_bad_test_every(source_dir):
    with pytest.raises(ValueError, match="test_every"):
        lm.split_files(lm.stdlib_files(root=source_dir), test_every=1)


def test_model_is_causal():
    torch.manual_seed(0)
    model = lm.TinyLM(TINY).double()
    x = torch.randint(0, lm.VOCAB, (3, 8))
    for k in (0, 3, 7):
        x2 = x.clone()
        x2[:, k] = (x2[:, k] + 1) % lm.VOCAB
        a, b = model.logits(x), model.logits(x2)
        torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=1e-12)
        assert (a[:, k:] - b[:, k:]).abs().amax() > 1e-6  # the change is seen from k on
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_sequence_loss_matches_materialised_logits():
    torch.manual_seed(1)
    model = lm.TinyLM(TINY).double()
    x, y = torch.randint(0, lm.VOCAB, (2, 4, 8))
    w = torch.rand(4, dtype=torch.float64) + 0.5
    loss, g = lm.sequence_loss(model, x, y, sample_weight=w, return_score=True)
    z = model.logits(x)
    rows = torch.nn.functional.cross_entropy(z.transpose(1, 2), y, reduction="none")
    torch.testing.assert_close(loss, (w[:, None] * rows).mean())
    p = z.softmax(-1) - torch.nn.functional.one_hot(y, lm.VOCAB)
    torch.testing.assert_close(g, p.square().sum((1, 2)).sqrt().float())
    with torch.inference_mode():
        torch.testing.assert_close(lm.sequence_scores(model)(model(x), y), g)


def _data(n=10, seed=0):
    """Half the sequences copies of one (learnt well: low scores), half random."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 32, (n, 9), generator=gen)
    s[: n // 2] = s[0]
    return s[:, :-1].contiguous(), s[:, 1:].contiguous()


def _flat_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _mc_bias(steps=1000):
    """Mean squared z-scores of the mean of ``steps`` importance-step gradients against the
    full-batch gradient (about 1 when unbiased): with the sampler's weights, and with the
    same draws at unit weights.

    A step's gradient is linear in its weights, so it is formed from the per-sequence
    gradients (checked against the real step's backward on the first steps); the draws and
    weights are the sampler's own, every step.
    """
    torch.manual_seed(0)
    x, y = _data()
    model = lm.TinyLM(lm.LMConfig(vocab=32, seq_len=8, d_model=8, n_layers=1, n_heads=1))
    model = model.double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):  # so that the scores differ: the repeated sequence is learnt
        opt.zero_grad()
        lm.sequence_loss(model, x[:5], y[:5]).backward()
        opt.step()
    per_seq = torch.stack(
        [_flat_grad(model, lm.sequence_loss(model, x[i : i + 1], y[i : i + 1])) for i in range(10)]
    )
    full = _flat_grad(model, lm.sequence_loss(model, x, y))
    torch.testing.assert_close(per_seq.mean(0), full)
    with torch.inference_mode():
        scores = lm.sequence_scores(model)(model(x), y)
    assert scores.std() / scores.mean() > 0.3  # heterogeneous: dropping weights is biased
    method = lm.ImportanceSequences(len(x), 2, model, seed=3, presample_size=len(x), tau_th=-1)
    grads, unweighted = [], []
    for step in range(steps):
        xb, yb, w = method.draw(model, x, y)
        idx = method.sampler.last_indices
        grads.append((w.double()[:, None] * per_seq[idx]).mean(0))
        unweighted.append(per_seq[idx].mean(0))
        if step < 3:  # the real weighted loss's gradient is that combination
            loss = lm.sequence_loss(model, xb, yb, sample_weight=w.double())
            torch.testing.assert_close(_flat_grad(model, loss), grads[-1])
        method.sampler.update(scores[idx])
    assert method.sampler.steps_importance == steps
    return tuple(_z2(torch.stack(g), full) for g in (grads, unweighted))


def _z2(grads, expected):
    se = grads.std(0) / len(grads) ** 0.5
    keep = se > 1e-12
    return (((grads.mean(0) - expected)[keep] / se[keep]) ** 2).mean().item()


def test_importance_step_is_unbiased_and_needs_its_weights():
    # the draws of b = 2 from the whole set (the presample) with weights 1 / (B g):
    # the mean gradient matches the full-batch one within Monte Carlo error
    weighted, unweighted = _mc_bias()
    assert weighted < 3.0
    assert unweighted > 30.0


def test_lm_run_trains_and_records():
    torch.manual_seed(0)
    x, y = _data(40)
    corpus = lm.Corpus(x, y, x[:4], y[:4], ["a.py"], ["b.py"])
    cfg = lm.LMConfig(vocab=lm.VOCAB, seq_len=8, d_model=8, n_layers=1, n_heads=2)
    for method, options in (("uniform", {}), ("importance", {"tau_th": -1.0})):
        run = lm.LMRun(
            method, corpus, float("inf"), 1e-2, batch_size=4, model_cfg=cfg, max_steps=30, **options
        )
        before = run.evaluate()
        run.advance()
        after, rec = run.evaluate(torch.arange(8)), run.record()
        assert rec["steps"] == 30 and run.done
        assert rec["importance_fraction"] == (1.0 if method == "importance" else 0.0)
        assert after["train_loss"] < before["train_loss"] - 0.5
    with pytest.raises(ValueError, match="method"):
        lm.make_method("history", 10, 2, run.model)


def test_example_script_runs(monkeypatch, capsys):
    script = Path(__file__).parents[1] / "examples" / "lm_sequence_importance.py"
    argv = ["x", "--steps", "3", "--max-bytes", "300000", "--d-model", "16", "--batch-size", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--tau-th", "-1", "--every", "0", "--threads", "1"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "importance steps 100%" in out and "test loss" in out


def test_cosine_lr():
    assert lm.cosine_lr(2.0, 0.0) == 2.0 and lm.cosine_lr(2.0, 1.5) == 0.0
    assert lm.cosine_lr(2.0, 0.5) == pytest.approx(1.0)
