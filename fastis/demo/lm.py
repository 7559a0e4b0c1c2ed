r"""Sequence importance sampling on a small causal language model, end to end.

The pieces of ``examples/lm_sequence_importance.py`` and ``bench/lm_sequences.py``:

- ``load_corpus``: a real text corpus every machine has offline, the Python standard
  library's own top-level source files (sorted by name, the first ``max_bytes`` of them),
  byte-level tokens (``V = 256``), split into train and test *by file*, each split's bytes
  concatenated and cut into sequences of ``T + 1`` tokens (``x = s[:-1]``, ``y = s[1:]``).
- ``TinyLM``: a decoder-only transformer built from ``LMConfig`` (no weights downloaded):
  token and position embeddings, pre-norm blocks of causal self-attention
  (``F.scaled_dot_product_attention(is_causal=True)``) and an MLP, and an output layer tied
  to the token embedding. ``model(x)`` returns the final hidden states ``[B, T, D]``; the
  loss is ``fastis.linear_cross_entropy(hidden, model.embed.weight, y)``, which never
  forms the ``[B T, V]`` logits for the whole batch.
- ``UniformSequences`` and ``ImportanceSequences``: one training step each. The second
  draws whole sequences with ``fastis.ImportanceSampler`` by their per-sequence score
  (``linear_cross_entropy(..., return_score=True)`` on ``[B, T, D]``:
  ``G_b = sqrt(sum_t ||p_bt - t_bt||^2)``) and trains on them with per-sequence weights
  ``w_b = 1 / (B g_b)``: with ``reduction='mean'`` the loss is
  ``(1 / (b T)) sum_b w_b sum_t L_bt``, unbiased for the mean token loss of the presample
  (hence of the training set) since every sequence has the same ``T`` tokens.
"""

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastis

VOCAB = 256  # bytes


# -- data ---------------------------------------------------------------------------------


def stdlib_files(max_bytes: int = 2_000_000, root: str | Path | None = None) -> list[Path]:
    """The first top-level ``*.py`` files of ``root`` (default: this Python's standard
    library), sorted by name, up to about ``max_bytes`` in all (at least one file)."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files, total = [], 0
    for path in sorted(root.glob("*.py")):
        if files and total + path.stat().st_size > max_bytes:
            break
        files.append(path)
        total += path.stat().st_size
    if not files:
        raise ValueError(f"root has no *.py files: {str(root)!r}")
    return files


def encode(text: bytes | str) -> torch.Tensor:
    """Byte-level tokens: ``[n]`` int64 in ``[0, 256)`` (str is UTF-8 encoded)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode(tokens: torch.Tensor) -> str:
    """The text of byte tokens (invalid UTF-8 replaced)."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def split_files(files: list[Path], test_every: int = 10) -> tuple[list[Path], list[Path]]:
    """(train, test): every ``test_every``-th file (the last of each group) is held out."""
    if test_every < 2:
        raise ValueError(f"test_every must be >= 2, got {test_every}")
    test = [f for i, f in enumerate(files) if i % test_every == test_every - 1]
    train = [f for i, f in enumerate(files) if i % test_every != test_every - 1]
    return train, test


def to_sequences(files: list[Path], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The files' bytes, concatenated in order and cut into ``(x, y)``, each ``[n, T]``
    int64, ``y`` the next byte of ``x`` (consecutive sequences overlap by one byte)."""
    stream = encode(b"".join(f.read_bytes() for f in files))
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"the files hold {len(stream)} bytes, too few for seq_len={seq_len}")
    x = stream[: n * seq_len].view(n, seq_len)
    y = stream[1 : n * seq_len + 1].view(n, seq_len)
    return x.contiguous(), y.contiguous()


@dataclass
class Corpus:
    """Train and test sequences (``[n, T]`` int64 each) and the files they come from."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_files: list[str]
    test_files: list[str]

    def to(self, device) -> "Corpus":
        t = [v.to(device) for v in (self.x_train, self.y_train, self.x_test, self.y_test)]
        return Corpus(*t, self.train_files, self.test_files)


def load_corpus(
    seq_len: int = 64, max_bytes: int = 2_000_000, test_every: int = 10, root=None
) -> Corpus:
    """The standard library corpus (``stdlib_files``, ``split_files``, ``to_sequences``)."""
    train, test = split_files(stdlib_files(max_bytes, root), test_every)
    if not test:
        raise ValueError(f"no test file: fewer than test_every={test_every} files")
    return Corpus(
        *to_sequences(train, seq_len),
        *to_sequences(test, seq_len),
        [f.name for f in train],
        [f.name for f in test],
    )


# -- model --------------------------------------------------------------------------------


@dataclass
class LMConfig:
    """A tiny decoder-only transformer."""

    vocab: int = VOCAB
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, each with a residual: ``[B, T, D]`` in/out."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model={cfg.d_model} must be a multiple of n_heads={cfg.n_heads}")
        self.heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, T, D/heads]
        h = h + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return h + self.mlp(self.norm2(h))


class TinyLM(nn.Module):
    """``model(x)``: token ids ``[B, T]`` (``T <= cfg.seq_len``) to the final hidden states
    ``[B, T, D]``; the logits would be ``hidden @ model.embed.weight.T`` (tied), which
    ``fastis.linear_cross_entropy`` never forms in full. ``model.logits(x)`` forms them."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"x has {T} tokens per sequence, more than seq_len={self.cfg.seq_len}")
        h = self.embed(x) + self.pos[:T]
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, V]`` (for tests and generation; training never forms them)."""
        return self(x) @ self.embed.weight.T


def sequence_loss(model: TinyLM, x, y, sample_weight=None, return_score=False):
    """The mean token loss of ``model`` on ``(x, y)`` (``[b, T]``), weighted per sequence by
    ``sample_weight`` ``[b]``; with ``return_score`` also the per-sequence scores ``[b]``."""
    return fastis.linear_cross_entropy(
        model(x), model.embed.weight, y, sample_weight=sample_weight, return_score=return_score
    )


def sequence_scores(model: TinyLM):
    """The sampler's ``score_fn(hidden, y) -> [b]``: ``linear_cross_entropy``'s
    per-sequence score of the hidden states ``model`` returns (the sampler calls it under
    ``torch.inference_mode``)."""

    def score_fn(hidden, y):
        return fastis.linear_cross_entropy(hidden, model.embed.weight, y, return_score=True)[1]

    return score_fn


@torch.inference_mode()
def mean_loss(model: TinyLM, x, y, batch: int = 256) -> float:
    """Mean token loss over ``(x, y)`` (eval mode, restored after)."""
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        h = model(x[i : i + batch])
        total += float(
            fastis.linear_cross_entropy(h, model.embed.weight, y[i : i + batch], reduction="sum")
        )
    model.train(was)
    return total / y.numel()


# -- one training step per method -------------------------------------------------------


class UniformSequences:
    """Shuffled passes over the sequences, ``b`` a step."""

    name = "uniform"

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        self.n, self.b = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def loss(self, model, x, y) -> torch.Tensor:
        if self.pos + self.b > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.b].to(x.device)
        self.pos += self.b
        return sequence_loss(model, x[idx], y[idx])

    def stats(self) -> dict:
        return {"steps_importance": 0}


class ImportanceSequences:
    """``fastis.ImportanceSampler`` over the sequences: a presample of ``B`` scored by
    ``linear_cross_entropy``'s per-sequence score while ``tau`` says it pays (``tau_th``:
    the sampler's default when None), ``b`` drawn with weights ``1 / (B g)``."""

    name = "importance"

    def __init__(
        self,
        n: int,
        batch_size: int,
        model: TinyLM,
        seed: int = 0,
        presample_size: int | None = None,
        tau_th: float | None = None,
    ):
        self.sampler = fastis.ImportanceSampler(
            n,
            batch_size,
            presample_size=presample_size,
            tau_th=tau_th,
            score_fn=sequence_scores(model),
            seed=seed,
        )
        self.batches = iter(self.sampler)

    def draw(self, model, x, y):
        """This step's ``(x_b, y_b, w)``: ``b`` sequences of ``(x, y)`` (``[n, T]``) and
        their weights ``[b]`` (ones while the switch is off)."""
        try:
            idx = next(self.batches)
        except StopIteration:  # the batch sampler's epoch is over; its stream goes on
            self.batches = iter(self.sampler)
            idx = next(self.batches)
        idx = torch.as_tensor(idx, device=x.device)
        return self.sampler.select(model, x[idx], y[idx])

    def loss(self, model, x, y) -> torch.Tensor:
        xb, yb, w = self.draw(model, x, y)
        loss, g = sequence_loss(model, xb, yb, sample_weight=w, return_score=True)
        self.sampler.update(g)
        return loss

    def stats(self) -> dict:
        return self.sampler.stats()


def make_method(name: str, n: int, batch_size: int, model: TinyLM, seed: int = 0, **options):
    """``'uniform'`` or ``'importance'`` (``options``: ``presample_size``, ``tau_th``)."""
    if name == "uniform":
        return UniformSequences(n, batch_size, seed)
    if name == "importance":
        return ImportanceSequences(n, batch_size, model, seed, **options)
    raise ValueError(f"method must be 'uniform' or 'importance', got {name!r}")


def cosine_lr(lr: float, fraction: float) -> float:
    """``lr (1 + cos(pi f)) / 2``, ``f`` clipped to ``[0, 1]``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


class LMRun:
    """One method's training run for ``budget`` seconds of its own training time.

    The model is built right after ``torch.manual_seed(seed)`` (so runs with the same seed
    start from the same weights), trained with AdamW at ``cosine_lr(lr, trained share)``;
    the clock (``fastis.demo.train.TrainingClock``) runs during steps only, so evaluations
    and, in an interleaved comparison, the other runs' slices never count.

    Args:
        method: ``'uniform'`` or ``'importance'``.
        corpus: the ``Corpus`` (on the run's device).
        budget: seconds of training (``math.inf`` with ``max_steps``).
        max_steps: stop after this many steps instead (the schedule then follows the
            share of steps).
        lr, seed, batch_size: the run's; ``model_cfg``: the ``LMConfig``.
        options: for ``make_method`` (``presample_size``, ``tau_th``).
    """

    def __init__(
        self,
        method: str,
        corpus: Corpus,
        budget: float,
        lr: float,
        seed: int = 0,
        batch_size: int = 16,
        model_cfg: LMConfig | None = None,
        weight_decay: float = 0.01,
        clock=None,
        max_steps: int | None = None,
        **options,
    ):
        from fastis.demo.train import TrainingClock

        self.method_name, self.corpus, self.budget, self.lr, self.seed = (
            method,
            corpus,
            float(budget),
            float(lr),
            seed,
        )
        device = corpus.x_train.device
        torch.manual_seed(seed)
        self.model = TinyLM(model_cfg or LMConfig(seq_len=corpus.x_train.shape[1])).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        n = len(corpus.x_train)
        self.method = make_method(method, n, batch_size, self.model, seed, **options)
        self.clock = TrainingClock(clock)
        self.cuda = device.type == "cuda"
        self.steps, self.max_steps = 0, max_steps
        self.last_loss = math.nan

    @property
    def done(self) -> bool:
        if self.max_steps is not None and self.steps >= self.max_steps:
            return True
        return self.clock.total >= self.budget

    @property
    def fraction(self) -> float:
        """The trained share of the run (of its steps with ``max_steps``, else of time)."""
        if self.max_steps is not None:
            return self.steps / self.max_steps
        return self.clock.total / self.budget

    def step(self) -> torch.Tensor:
        """One timed step: the rate from the trained share, the method's loss, AdamW."""
        self.clock.start()
        lr = cosine_lr(self.lr, self.fraction)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self.method.loss(self.model, self.corpus.x_train, self.corpus.y_train)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.cuda:
            torch.cuda.synchronize()
        self.clock.stop()
        self.steps += 1
        return loss.detach()

    def advance(self, seconds: float = math.inf) -> float:
        """Trains about ``seconds`` more (to the step that passes them, at least one step)
        or to the budget;
        returns the seconds trained. Keeps the last step's loss in ``last_loss`` (read on
        the host once per call, not per step)."""
        start, loss = self.clock.total, None
        while not self.done and (loss is None or self.clock.total - start < seconds):
            loss = self.step()
        if loss is not None:
            self.last_loss = float(loss)
        return self.clock.total - start

    def evaluate(self, eval_idx: torch.Tensor | None = None) -> dict:
        """``train_loss`` on the training sequences ``eval_idx`` (default: all) and
        ``test_loss`` on the held-out files' sequences (mean token losses, nats)."""
        c = self.corpus
        x, y = (
            (c.x_train, c.y_train)
            if eval_idx is None
            else (c.x_train[eval_idx], c.y_train[eval_idx])
        )
        return {
            "train_loss": mean_loss(self.model, x, y),
            "test_loss": mean_loss(self.model, c.x_test, c.y_test),
        }

    def record(self) -> dict:
        """Steps, seconds, ms/step and the share of importance steps."""
        importance = int(self.method.stats().get("steps_importance", 0))
        return {
            "method": self.method_name,
            "lr": self.lr,
            "seed": self.seed,
            "steps": self.steps,
            "seconds": self.clock.total,
            "ms_per_step": 1e3 * self.clock.total / max(self.steps, 1),
            "importance_fraction": importance / max(self.steps, 1),
        }


def eval_subset(n: int, size: int = 512, seed: int = 0) -> torch.Tensor:
    """A fixed subset of ``min(size, n)`` training sequences for the held-in loss."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[: min(size, n)].sort().values
