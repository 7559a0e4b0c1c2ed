"""fastis.integrations.transformers: ImportanceTrainer trains tiny models built from configs
(no downloads) on the CPU; the gradient equals the float64 gradient of the weighted,
normalised loss under gradient accumulation, the switch turns on and is logged, a resume
from a checkpoint continues the exact index stream."""

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from fastis.integrations.transformers import ImportanceTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V, T, N, B = 40, 10, 48, 4


class Sequences(torch.utils.data.Dataset):
    """Random token sequences of varying length (padding labelled -100), with a class."""

    def __init__(self, seed=0, labels="tokens"):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, V, (N, T), generator=g)
        self.lengths = torch.randint(3, T + 1, (N,), generator=g)
        self.cls = torch.randint(0, 3, (N,), generator=g)
        self.labels = labels  # "tokens" (the inputs), "sequence" or "token" classes

    def __len__(self):
        return N

    def __getitem__(self, i):
        n = int(self.lengths[i])
        mask = (torch.arange(T) < n).long()
        ids = self.ids[i] * mask
        if self.labels == "sequence":
            labels = self.cls[i]
        else:
            labels = ids % 3 if self.labels == "token" else ids
            labels = labels.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_lm():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def bert_config():
    torch.manual_seed(0)
    return transformers.BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=T, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def sequence_classifier():
    return transformers.BertForSequenceClassification(bert_config())


def token_classifier():
    return transformers.BertForTokenClassification(bert_config())


MODELS = {  # model, labels of the data set
    "causal-lm": (causal_lm, "tokens"),
    "seq-cls": (sequence_classifier, "sequence"),
    "token-cls": (token_classifier, "token"),
}


class Recorder(transformers.TrainerCallback):
    """Records what select received and returned, and checks each optimizer step's
    gradient against a float64 copy of the model fed the same rows and weights."""

    def __init__(self, trainer, check_grads):
        self.trainer, self.check_grads = trainer, check_grads
        self.calls, self.window = [], []  # all selects; those of the current step
        self.grads_checked = 0

    def instrument(self, sampler):
        select = sampler.select

        def recording(model, inputs, targets):
            x, y, w = select(model, inputs, targets)
            rec = {"n": len(targets), "labels": targets, "x": x, "y": y, "w": w}
            rec["indices"] = sampler.last_indices.tolist()
            self.calls.append(rec)
            self.window.append(rec)
            return x, y, w

        sampler.select = recording

    def on_step_begin(self, args, state, control, **kwargs):
        self.window = []
        if self.check_grads:
            self.before = copy.deepcopy(self.trainer.model).double()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.check_grads:
            return
        model = self.before
        items = sum(int((r["labels"] != -100).sum()) for r in self.window)  # shifted already
        loss = 0.0
        for r in self.window:
            logits = model(**r["x"]).logits.double()
            if self.trainer._shifts_labels():
                logits = logits[:, :-1]
            rows = torch.nn.functional.cross_entropy(
                logits.flatten(0, -2), r["y"].flatten(), reduction="none"
            ).view(r["y"].shape)
            per_seq = rows.sum(-1) if rows.dim() == 2 else rows
            loss = loss + (r["n"] / len(r["w"])) * (per_seq * r["w"].double()).sum() / items
        loss.backward()
        for (name, p), q in zip(
            self.trainer.model.named_parameters(), model.parameters(), strict=True
        ):
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=name)
        self.grads_checked += 1


def make_trainer(tmp_path, model, dataset, *, steps, check_grads=False, **kwargs):
    sampler_kwargs = kwargs.pop("sampler_kwargs", {})
    kwargs.setdefault("save_strategy", "no")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        per_device_train_batch_size=B,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=1e-2,
        max_grad_norm=0.0,  # no clipping: the gradient check sees the raw gradient
        logging_steps=1,
        seed=0,
        **kwargs,
    )
    trainer = ImportanceTrainer(
        model=model, args=args, train_dataset=dataset, sampler_kwargs=sampler_kwargs
    )
    rec = Recorder(trainer, check_grads)
    trainer.add_callback(rec)
    trainer.sampler = trainer.make_sampler(len(dataset))
    rec.instrument(trainer.sampler)
    return trainer, rec


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_weights_reach_the_gradient(tmp_path, kind):
    """Always on (tau_th < 0): presamples of 3b, non-unit weights, 2 accumulation steps;
    the gradient is that of world_size * (n / b) sum_i w_i S_i / num_items."""
    make_model, labels = MODELS[kind]
    dataset = Sequences(labels=labels)
    trainer, rec = make_trainer(
        tmp_path, make_model(), dataset, steps=2, check_grads=True,
        sampler_kwargs={"tau_th": -1.0},
    )  # fmt: skip
    trainer.train()
    assert rec.grads_checked == 2
    assert all(r["n"] == 3 * B and len(r["w"]) == B for r in rec.calls)
    assert not all(torch.all(r["w"] == 1) for r in rec.calls)
    # evaluation is the Trainer's own: no selection, the unweighted loss
    calls = len(rec.calls)
    metrics = trainer.evaluate(dataset)
    assert len(rec.calls) == calls and metrics["eval_loss"] > 0


def test_uniform_steps_match_the_trainer_loss(tmp_path):
    """Off (tau_th = inf): the loss is the Trainer's own token mean over the window."""
    trainer, rec = make_trainer(
        tmp_path, causal_lm(), Sequences(), steps=1, check_grads=True,
        sampler_kwargs={"tau_th": float("inf")},
    )  # fmt: skip
    trainer.train()
    assert rec.grads_checked == 1 and all(r["n"] == B for r in rec.calls)
    # the reference: the model's own loss with the Trainer's num_items_in_batch
    model = copy.deepcopy(rec.before).float()
    items = sum(int((r["labels"] != -100).sum()) for r in rec.calls)
    ref = 0.0
    for r in rec.calls:
        labels = r["x"]["input_ids"].masked_fill(r["x"]["attention_mask"] == 0, -100)
        ref = ref + model(**r["x"], labels=labels, num_items_in_batch=items).loss
    ours = trainer.state.log_history[0]["loss"]
    assert ours == pytest.approx(float(ref.detach()), rel=1e-4)


def test_switch_turns_on_and_is_logged(tmp_path):
    trainer, rec = make_trainer(
        tmp_path, causal_lm(), Sequences(), steps=6,
        sampler_kwargs={"tau_th": 0.9, "a_tau": 0.5},
    )  # fmt: skip
    trainer.train()
    on = [r["n"] != len(r["w"]) for r in rec.calls]
    assert not on[0] and on[-1]
    logs = [h for h in trainer.state.log_history if "fastis/tau" in h]
    assert logs and logs[-1]["fastis/importance_share"] > 0
    assert logs[0]["fastis/importance_share"] < logs[-1]["fastis/importance_share"]


def test_resume_continues_the_index_stream(tmp_path):
    """Uninterrupted: 8 steps (6 per epoch, so one crossing), a checkpoint at step 3;
    resumed from it: steps 4..8 select exactly the same indices."""
    kwargs = {"sampler_kwargs": {"tau_th": 0.9, "a_tau": 0.5}, "save_strategy": "steps"}
    full, rec_full = make_trainer(
        tmp_path, causal_lm(), Sequences(), steps=8, save_steps=3, **kwargs
    )
    full.train()
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / "fastis_sampler_rank0.pt").exists()

    again, rec_again = make_trainer(
        tmp_path, causal_lm(), Sequences(), steps=8, save_steps=3, **kwargs
    )
    again.train(resume_from_checkpoint=str(ckpt))
    seen_full = [r["indices"] for r in rec_full.calls]
    seen_again = [r["indices"] for r in rec_again.calls]
    assert len(seen_again) == 2 * 5
    assert seen_again == seen_full[2 * 3 :]
    assert any(r["n"] != len(r["w"]) for r in rec_again.calls)


def test_resume_without_sampler_state_is_refused(tmp_path):
    trainer, _ = make_trainer(
        tmp_path, causal_lm(), Sequences(), steps=2, save_strategy="steps", save_steps=1
    )
    trainer.train()
    os.remove(tmp_path / "checkpoint-1" / "fastis_sampler_rank0.pt")
    again, _ = make_trainer(tmp_path, causal_lm(), Sequences(), steps=2)
    with pytest.raises(FileNotFoundError, match="no sampler state fastis_sampler_rank0.pt"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_unsupported_options_are_refused(tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], label_smoothing_factor=0.1
    )
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        ImportanceTrainer(model=causal_lm(), args=args, train_dataset=Sequences())
