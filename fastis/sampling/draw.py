"""The importance step of one presample: its scoring pass, the draw of ``b`` of ``B`` with
probabilities ``g``, the weights ``1 / (B g)``, the fallback for bad scores, and the
counters behind ``stats()``."""

import math

import torch

from fastis.alias import sample
from fastis.sampling.batches import num_rows, slice_rows
from fastis.sampling.checks import check_scores, state_tensor


def score_presample(model, score_fn, inputs, targets, *, chunk_size, eval_mode, inference):
    """``score_fn(model(inputs), targets)`` without gradient, ``chunk_size`` rows at a time
    (None: all at once), an ``nn.Module`` in eval mode when ``eval_mode`` (its mode
    restored after), under ``torch.inference_mode`` (``inference``) or ``torch.no_grad``.

    Returns:
        ``[B]`` floating scores, one per row, as ``score_fn`` returns them (checked).
    """
    if not callable(model):
        raise TypeError(f"model must be callable (inputs -> outputs), got {type(model).__name__}")
    n = num_rows(inputs)
    chunk = chunk_size or n
    module = isinstance(model, torch.nn.Module) and eval_mode and model.training
    if module:
        model.eval()
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            if chunk >= n:  # one pass, no slicing
                return check_scores(score_fn(model(inputs), targets), n, "score_fn's result")
            parts = []
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                out = model(slice_rows(inputs, start, stop))
                s = score_fn(out, slice_rows(targets, start, stop))
                parts.append(check_scores(s, stop - start, "score_fn's result"))
            return torch.cat(parts)
    finally:
        if module:
            model.train()


def score_summary(scores: torch.Tensor):
    """``(s, total, valid, usable)`` of scores ``[n]``: ``s`` in float64, its sum, whether
    all are finite and non-negative, and whether they are also not all zero (0-d bool
    tensors; no synchronisation). A NaN fails ``amin >= 0``; a NaN or inf makes the sum
    fail ``< inf`` (cheaper than ``isfinite``, which is four ops)."""
    s = scores.to(torch.float64)
    total = s.sum()
    valid = (s.amin() >= 0) & (total < math.inf)
    return s, total, valid, valid & (total > 0)


def generator_state(gen):
    """A saved draw generator, ``None`` or ``{"device": str, "state": uint8 tensor}``,
    checked by loading it into a fresh generator of that device type where one exists;
    returns ``None`` or ``(device type, state)``."""
    if gen is None:
        return None
    if (
        not isinstance(gen, dict)
        or not isinstance(gen.get("device"), str)
        or not isinstance(gen.get("state"), torch.Tensor)
        or gen["state"].dtype != torch.uint8
    ):
        raise TypeError(
            "state_dict['generator'] must be None or {'device': str, 'state': a uint8 tensor}"
        )
    kind, state = gen["device"], gen["state"].cpu().clone()
    if kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()):
        try:
            torch.Generator(device=kind).set_state(state)
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"state_dict['generator'] is not a {kind} generator's state: {e}"
            ) from None
    return kind, state


class PresampleDraw:
    """Draws ``b`` positions of a scored presample and their weights, and counts.

    ``draw`` samples with replacement from ``g = s / sum(s)`` (``fastis.sample``) and
    weights each drawn position ``1 / (B g_i)``; NaN, infinite, negative or all-zero
    scores draw uniformly with unit weights. The generator is created on the scores'
    device at the first draw, seeded with ``seed`` (or set to a loaded state of that
    device type). The counters are 0-d float64 tensors on the same device: nothing here
    synchronises until ``values``.

    Attributes (counters): weight_sum, weight_max (over the drawn weights),
    invalid_steps (steps with NaN / inf / negative scores, both modes), zero_steps
    (importance steps with all-zero scores).
    """

    COUNTERS = ("weight_sum", "weight_max", "invalid_steps", "zero_steps")

    def __init__(self, seed: int):
        self.seed = seed
        self._gen: torch.Generator | None = None
        self._gen_state: tuple[str, torch.Tensor] | None = None  # loaded, not yet applied
        for name in self.COUNTERS:
            setattr(self, name, torch.zeros((), dtype=torch.float64))

    def draw(self, s, total, valid, usable, n: int):
        """``(positions int64 [n], weights float32 [n])`` from ``score_summary``'s values:
        ``n`` iid draws of one presample (``n = b``, or ``k b`` for ``k`` steps). Counts the
        presample's invalid / zero scores; the weights are counted by ``count_weights`` as
        they are used."""
        safe = torch.where(usable, s, 1.0)
        pos, p = sample(safe, n, generator=self._generator(s.device), return_probs=True)
        w = torch.where(usable, (p * s.shape[0]).reciprocal_(), 1.0).float()
        self._to(w.device)
        self.invalid_steps.add_(~valid)
        self.zero_steps.add_(valid ^ usable)  # usable implies valid: valid and all zero
        return pos, w

    def count_weights(self, w: torch.Tensor) -> None:
        """Folds one step's weights ``[b]`` into ``weight_sum`` / ``weight_max``."""
        self._to(w.device)
        self.weight_sum.add_(w.sum(dtype=torch.float64))
        torch.maximum(self.weight_max, w.max(), out=self.weight_max)

    def count_invalid(self, valid: torch.Tensor) -> None:
        """Counts a uniform step's scores (``valid`` from ``score_summary``)."""
        self._to(valid.device)
        self.invalid_steps.add_(~valid)

    def values(self) -> dict:
        """The counters as Python floats (one synchronisation)."""
        vals = torch.stack([getattr(self, k).cpu() for k in self.COUNTERS]).tolist()
        return dict(zip(self.COUNTERS, vals, strict=True))

    def _to(self, dev: torch.device) -> None:
        if self.weight_sum.device != dev:
            for name in self.COUNTERS:
                setattr(self, name, getattr(self, name).to(dev))

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device.type != device.type:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
            if self._gen_state is not None:
                kind, state = self._gen_state
                if kind == device.type:
                    self._gen.set_state(state)
                self._gen_state = None
        return self._gen

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        gen = None
        if self._gen is not None:
            gen = {"device": self._gen.device.type, "state": self._gen.get_state()}
        elif self._gen_state is not None:
            gen = {"device": self._gen_state[0], "state": self._gen_state[1]}
        return {**{k: getattr(self, k).cpu().clone() for k in self.COUNTERS}, "generator": gen}

    def parse_state(self, state: dict) -> dict:
        """The counters (float64 0-d, finite, >= 0) and generator of ``state``, checked."""
        parsed = {k: state_tensor(state, k, (), torch.float64) for k in self.COUNTERS}
        parsed["generator"] = generator_state(state["generator"])
        return parsed

    def restore(self, parsed: dict) -> None:
        dev = self.weight_sum.device
        for k in self.COUNTERS:
            setattr(self, k, parsed[k].to(dev))
        self._gen = None
        self._gen_state = parsed["generator"]
