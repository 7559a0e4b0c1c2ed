r"""The gradient noise of an importance step against a uniform batch of ``b``, and the
constant-noise batch size that spends the difference on fewer backpropagated rows.

Let ``M`` be the per-example second moment of the gradients. A uniform batch of ``b`` has
noise (trace of the covariance) about ``M / b``. An importance step trains on ``n`` rows
drawn with replacement from a presample of ``B`` with probabilities ``g`` and weights
``1 / (B g)``; given the presample its noise is ``M / (n tau^2)``, with
``tau^2 = |U| sum g_i^2`` the ratio of the second moments of a uniform and a weighted
draw (``compute_tau``), and the presample itself, a uniform sample of ``B`` shared by the
``k`` steps it serves, adds ``M / B`` per step (``k M / B`` to the variance of a step's
share of their sum). So

    ``VR = (1 / b) / (1 / (n tau^2) + k / B)``

is the reduction against the uniform batch (``1 / (1 / tau^2 + k b / B)`` for ``n = b``,
at most ``B / (k b)``), and the ``n`` that keeps ``VR = 1`` (the noise of the uniform
batch, so a schedule tuned for ``b`` stays valid) is

    ``n = 1 / (tau^2 (1 / b - k / B))``

(impossible when ``k b >= B``: then ``n = b``). The constant-noise mode trains on
``n`` rounded up to a multiple of ``min_rows`` (so at most ``b / min_rows`` shapes), within
``[min_rows, b]``.
"""

import math

from fastis._checks import int_arg


def variance_reduction(tau: float, rows: int, b: int, big_b: int, k: int) -> float:
    """``VR = (1 / b) / (1 / (rows tau^2) + k / B)``; ``tau`` below 1 counts as 1 (equal
    scores; the smoothed ``tau`` starts at 0)."""
    tau2 = max(tau, 1.0) ** 2
    return (1.0 / b) / (1.0 / (rows * tau2) + k / big_b)


def constant_noise_rows(tau: float, b: int, big_b: int, k: int, min_rows: int) -> int:
    """The rows of an importance step with the noise of a uniform batch of ``b``:
    ``1 / (tau^2 (1 / b - k / B))`` rounded up to a multiple of ``min_rows``, in
    ``[min_rows, b]`` (``b`` when ``k b >= B``)."""
    gap = 1.0 / b - k / big_b
    if gap <= 0.0:
        return b
    n = 1.0 / (max(tau, 1.0) ** 2 * gap)
    if not n < b:  # also catches inf / NaN
        return b
    return min(b, max(min_rows, min_rows * math.ceil(n / min_rows)))


def noise_args(constant_noise, min_batch_size, b: int) -> tuple[bool, int]:
    """``(constant_noise, min_batch_size)`` checked; ``min_batch_size`` defaults to
    ``ceil(b / 8)`` and must be in ``[1, b]``."""
    if not isinstance(constant_noise, bool):
        raise TypeError(f"constant_noise must be a bool, got {type(constant_noise).__name__}")
    m = -(-b // 8) if min_batch_size is None else int_arg("min_batch_size", min_batch_size)
    if m > b:
        raise ValueError(f"min_batch_size must be <= batch_size={b}, got {m}")
    return constant_noise, m
