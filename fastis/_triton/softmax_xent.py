"""Fused softmax cross-entropy rows: loss, gradient-norm score and (optionally) gradient.

``softmax_xent`` serves ``fastis.score`` and ``fastis.cross_entropy``; it picks one kernel
by the kind of target, each in its own file and read top to bottom:

- ``xent_hard``: class indices, no smoothing. One sweep gives loss and score; a second
  only when the gradient is written.
- ``xent_smooth``: class indices with label smoothing. Two sweeps (the score needs the
  gradient's entries).
- ``xent_soft``: target distributions (smoothed or not). Two sweeps.

All of them: float32 arithmetic, any strides, ``[N, C]`` and ``[B, T, C]``; the second
sweep re-reads the row while it is still in L2. A row with a NaN or ``+inf`` logit (or no
logit above ``-inf``) has NaN loss, score and gradient; ``-inf`` logits are masked classes;
a class index outside ``[0, C)`` gives a NaN row and is never read; ignored rows are 0
everywhere. The math is ``fastis.reference.softmax_xent``'s.
"""

from fastis._triton.scale_rows import scale_rows_
from fastis._triton.xent_hard import xent_hard
from fastis._triton.xent_smooth import xent_smooth
from fastis._triton.xent_soft import xent_soft

__all__ = ["scale_rows_", "softmax_xent"]


def softmax_xent(
    logits, target, *, ignore_index=-100, label_smoothing=0.0, grad=None, grad_scale=None
):
    """Launches the kernel for ``target``'s kind; same contract as the reference's.

    Args:
        logits: ``[N, C]`` or ``[B, T, C]``, any strides, float16/bfloat16/float32.
        target: ``[N]`` / ``[B, T]`` integer class indices, or floating probabilities shaped
            like ``logits`` (``ignore_index`` does not apply to those); any strides.
        ignore_index: class-index rows with this target get loss 0, score 0, gradient 0.
        label_smoothing: ``e`` in ``[0, 1]``; the target becomes ``(1 - e) t + e / C``.
        grad: optional output shaped like ``logits``, any strides (may be ``logits``
            itself: each element is read before it is overwritten); receives
            ``grad_scale[r] * dloss_r / dz_r``.
        grad_scale: optional float32 factor per row for ``grad``, ``[n_rows]`` (any stride),
            or one factor for all rows.

    Returns:
        ``(loss, score)``, float32, shaped ``logits.shape[:-1]``. No host synchronisation.
    """
    if target.is_floating_point():
        return xent_soft(
            logits, target, label_smoothing=label_smoothing, grad=grad, grad_scale=grad_scale
        )
    if label_smoothing > 0:
        return xent_smooth(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
            grad=grad, grad_scale=grad_scale,
        )  # fmt: skip
    return xent_hard(logits, target, ignore_index=ignore_index, grad=grad, grad_scale=grad_scale)
