"""The importance step of one presample: its scoring pass, the draw of ``b`` of ``B`` with
probabilities ``g``, the weights ``1 / (B g)``, the fallback for bad scores, and the
counters behind ``stats()``."""

import math
from contextlib import nullcontext

import torch

from fastis.alias import sample_unchecked
from fastis.sampling.batches import num_rows, slice_rows
from fastis.sampling.checks import check_scores, state_tensor
from fastis.sampling.modes import eval_mode as module_eval_mode
from fastis.sampling.switch import tau_from_values


def score_presample(model, score_fn, inputs, targets, *, chunk_size, eval_mode, inference):
    """``score_fn(model(inputs), targets)`` without gradient, ``chunk_size`` rows at a time
    (None: all at once), an ``nn.Module`` in eval mode when ``eval_mode`` (each module's
    mode restored after: ``fastis.sampling.modes``), under ``torch.inference_mode``
    (``inference``) or ``torch.no_grad``.

    Returns:
        ``[B]`` floating scores, one per row, as ``score_fn`` returns them (checked).
    """
    if not callable(model):
        raise TypeError(f"model must be callable (inputs -> outputs), got {type(model).__name__}")
    n = num_rows(inputs)
    chunk = chunk_size or n
    module = isinstance(model, torch.nn.Module) and eval_mode
    with module_eval_mode(model) if module else nullcontext():
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

    ``draw`` samples with replacement from ``g = s / sum(s)`` (``fastis.sample``'s method
    and random numbers) and weights each drawn position ``1 / (B g_i)``; NaN, infinite,
    negative or all-zero scores draw uniformly with unit weights. The generator is created
    on the scores' device at the first draw, seeded with ``seed`` (or set to a loaded
    state of that device type). The counters are 0-d float64 tensors on the same device:
    nothing here synchronises until ``values``.

    Attributes (counters): weight_sum, weight_max (over the drawn weights; CPU steps'
    weights are summed on the host and added in ``values`` / ``state_dict``),
    invalid_steps (steps with NaN / inf / negative scores), zero_steps (importance steps
    with all-zero scores): these two as loaded from a checkpoint; the steps since are
    counted on the host by ``SmoothedTau``, from the validity that ``draw`` returns.
    """

    COUNTERS = ("weight_sum", "weight_max", "invalid_steps", "zero_steps")

    def __init__(self, seed: int):
        self.seed = seed
        self._gen: torch.Generator | None = None
        self._gen_state: tuple[str, torch.Tensor] | None = None  # loaded, not yet applied
        self._ones: dict[int, torch.Tensor] = {}  # B -> float64 ones, the uniform fallback
        self._host_weights = (0.0, 0.0)  # weight sum and max of CPU steps, not yet counted
        for name in self.COUNTERS:
            setattr(self, name, torch.zeros((), dtype=torch.float64))

    def draw(self, scores: torch.Tensor, n: int):
        """``(positions int64 [n], weights float32 [n], norm_g, valid, usable)`` for the
        presample's scores ``[B]`` (floating, any device): ``n`` iid draws (``n = b``, or
        ``k b`` for ``k`` steps) from ``g = s / sum(s)``, with ``s`` the scores in float64;
        ``norm_g = ||g||_2`` (``tau_new = sqrt(B) norm_g``, ``compute_tau``, unless all
        scores are 0), ``valid``: all finite and non-negative, ``usable``: also not all 0
        (float64 / bool 0-d tensors, for ``SmoothedTau.observe_presample``, which counts
        the invalid and all-zero presamples). The weights are counted by
        ``count_weights`` as they are used.

        Cost: about 20 tensor operations and no host synchronisation. ``s.amin() >= 0``
        fails for a NaN and ``sum(s) < inf`` for an infinity or an overflowing sum, so
        ``valid`` costs two reductions (cheaper than ``isfinite``). Scores that are not
        ``usable`` draw from ``g = 1 / B`` (an inverse CDF over ``1, 2, ..., B``, whose
        draws are exact), and their weights ``1 / (B (1 / B))`` round to exactly 1.0 in
        float32, so no second ``where`` is needed for them."""
        s = scores.to(torch.float64)
        big_b = s.shape[0]
        total = s.sum()
        valid = (s.amin() >= 0) & (total < math.inf)
        usable = valid & (total > 0)
        norm_g = torch.linalg.vector_norm(s / total)
        safe = torch.where(usable, s, 1.0)
        pos, p = sample_unchecked(safe, n, self._generator(s.device), check=False)
        w = p.mul_(big_b).reciprocal_().float()
        return pos, w, norm_g, valid, usable

    def draw_host(self, scores: torch.Tensor, n: int):
        """``draw`` for CPU scores, their summary computed on the host: ``(positions,
        weights, tau_new, valid, usable)`` with the last three Python values
        (``fastis.sampling.switch.tau_from_values``: ``tau_new`` NaN when not ``valid``, 1
        for all-zero scores), for ``SmoothedTau.observe_presample_host``.

        The same draws and weights as ``draw`` (the same inverse CDF or table, accumulated
        in float64 from the scores themselves, over ``1, ..., B`` for scores that are not
        ``usable``), in about 10 tensor operations instead of 20: one read of the ``B``
        scores replaces the reductions, whose cost on the CPU is the dispatch of each
        operation, not its arithmetic. Only for CPU tensors drawn by the torch path
        (reading device memory would synchronise)."""
        values = scores.tolist()
        tau_new, valid = tau_from_values(values)
        usable = valid and any(values)
        big_b = len(values)
        if not usable:  # uniform over the presample, unit weights
            scores = self._ones.get(big_b)
            if scores is None:
                scores = self._ones[big_b] = torch.ones(big_b, dtype=torch.float64)
        pos, p = sample_unchecked(scores, n, self._generator(scores.device), check=False)
        w = p.mul_(big_b).reciprocal_().float()
        return pos, w, tau_new, valid, usable

    def count_weights(self, w: torch.Tensor) -> None:
        """Folds one step's weights ``[b]`` into ``weight_sum`` / ``weight_max`` (CPU
        weights: read at once and summed on the host, in float64, which costs less than the
        four tensor operations of the device's running sum and maximum)."""
        if w.device.type == "cpu":
            values = w.tolist()
            self._host_weights = (
                self._host_weights[0] + sum(values),
                max(self._host_weights[1], max(values)),
            )
            return
        self._to(w.device)
        self.weight_sum.add_(w.sum(dtype=torch.float64))
        torch.maximum(self.weight_max, w.max(), out=self.weight_max)

    def values(self) -> dict:
        """The counters as Python floats (one synchronisation)."""
        vals = torch.stack([getattr(self, k).cpu() for k in self.COUNTERS]).tolist()
        vals[0] += self._host_weights[0]
        vals[1] = max(vals[1], self._host_weights[1])
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
        counts = {k: getattr(self, k).cpu().clone() for k in self.COUNTERS}
        counts["weight_sum"] += self._host_weights[0]
        counts["weight_max"].clamp_(min=self._host_weights[1])
        return {**counts, "generator": gen}

    def parse_state(self, state: dict) -> dict:
        """The counters (float64 0-d, finite, >= 0) and generator of ``state``, checked."""
        parsed = {k: state_tensor(state, k, (), torch.float64) for k in self.COUNTERS}
        parsed["generator"] = generator_state(state["generator"])
        return parsed

    def restore(self, parsed: dict) -> None:
        dev = self.weight_sum.device
        for k in self.COUNTERS:
            setattr(self, k, parsed[k].to(dev))
        self._host_weights = (0.0, 0.0)
        self._gen = None
        self._gen_state = parsed["generator"]
