"""The ``torch.library`` ops behind ``fastis.score`` and ``fastis.cross_entropy``.

Every op is a ``custom_op`` with a fake implementation, so ``torch.compile(fullgraph=True)``
treats it as one opaque call. Its body is the plain-torch path (``fastis.reference``), which
serves every device; the kernel registered for CPU and CUDA reads the backend once per
call (``fastis._backend.kernel_backend``) and runs the Triton kernel
(``fastis._triton.softmax_xent``), the native library (``fastis._native``, on request) or
that torch path. float64 logits never take the Triton kernels, which accumulate in float32:
float64 stays float64 all the way.

- ``softmax_xent(logits, target, ignore_index, label_smoothing, compute_score)``:
  ``(loss, score)`` per row (``score`` empty unless asked), differentiable through ``loss``
  w.r.t. ``logits`` and soft targets.
- ``softmax_xent_grad(logits, target, ignore_index, label_smoothing, grad_loss)``: its
  backward, ``grad_loss[r] * dloss_r / dlogits_r`` (the same kernel again: one read of the
  logits, one write of the gradient, nothing kept between forward and backward but the
  logits). It is differentiable in turn (double backward, e.g. gradient penalties) through
  the Hessian-vector formula in ``_grad_backward``, in torch ops.
- the in-place ops ``softmax_xent_`` and ``scale_rows_`` live in ``fastis.grad_in_forward``
  with the ``autograd.Function`` that forms the gradient in forward.

``softmax_xent_autograd`` is what ``cross_entropy`` calls: the op itself while
``torch.compile`` traces, and in eager mode an ``autograd.Function`` with the very same
``setup_context`` / ``backward`` (plus forward-mode AD), because the custom-op autograd
layer costs about 45 us per forward and backward on the CPU (measured: 100 against 55 us
for a trivial op), a few percent of a small model's step. No host synchronisation anywhere,
except the class-index range check on CPU tensors.
"""

import torch

from fastis import reference
from fastis._backend import kernel_backend


def out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# how many dispatch modes are active (torch.utils._python_dispatch's
# _get_current_dispatch_mode tests the same, in one more Python frame)
dispatch_modes = torch._C._len_torch_dispatch_stack


def kernels_for(logits: torch.Tensor):
    """The one backend decision of a call: the module whose ``softmax_xent`` /
    ``scale_rows_`` launchers run it (Triton's or the native library's), or None for the
    torch path (float64 and C = 0 always take it on the Triton backend)."""
    if logits.shape[-1] == 0:
        return None
    backend = kernel_backend(logits)
    if backend == "native":
        from fastis import _native

        return _native
    if backend == "triton" and logits.dtype != torch.float64:
        # imported on first use: Triton reads TRITON_INTERPRET when the kernels are defined
        from fastis._triton import softmax_xent as kernel

        return kernel
    return None


def check_values(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """Raises for class indices out of range. Returns None when nothing was read, else
    whether every index is in ``[0, C)`` and none is ``ignore_index`` (the torch path then
    skips its per-row masks). Reads the values of CPU tensors only (on CUDA it would
    synchronise; the kernels mark such rows NaN and read nothing out of bounds instead)."""
    if logits.device.type == "cpu" and not target.is_floating_point():
        return check_target_range(target, logits.shape[-1], ignore_index)
    return None


def launch_rows(kernels, logits, target, ignore_index: int, label_smoothing: float, **grad):
    """``kernels.softmax_xent(...)`` with the class-index check of ``check_values``: the
    native library counts indices out of range in its own read of the targets (on the CPU;
    the same ``ValueError``), for the Triton kernels they are read once before."""
    if kernels.__name__ == "fastis._native":
        return kernels.softmax_xent(
            logits,
            target,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            check_target=True,
            **grad,
        )
    check_values(logits, target, ignore_index)
    return kernels.softmax_xent(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, **grad
    )


def row_scale(scale: torch.Tensor, kernels) -> torch.Tensor:
    """A per-row factor as the launchers take it: flat; float32 for Triton (the native
    library converts it itself, keeping float64 for float64 logits)."""
    scale = scale.reshape(-1)
    return scale if kernels.__name__ == "fastis._native" else scale.float()


# --------------------------------------------------------------------------------------
# fastis::softmax_xent: per-row loss and score


@torch.library.custom_op("fastis::softmax_xent", mutates_args=())
def softmax_xent(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    compute_score: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, score)`` per row, shaped ``logits.shape[:-1]``, float32 (float64 for
    float64 logits); ``score`` is empty unless ``compute_score``."""
    return _torch_softmax_xent(logits, target, ignore_index, label_smoothing, compute_score)


def _torch_softmax_xent(
    logits, target, ignore_index, label_smoothing, compute_score, clean: bool | None = None
):
    if compute_score and clean is not None and not label_smoothing and logits.shape[-1]:
        # class indices checked on the CPU: torch's cross-entropy and the few-op score
        return reference.cross_entropy_score_rows(
            logits, target, ignore_index=ignore_index, clean=clean
        )
    if not compute_score:
        loss = reference.cross_entropy_rows(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing
        )
        return loss, logits.new_empty(0, dtype=loss.dtype)
    loss, score, _ = reference.softmax_xent(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    return loss, score


@softmax_xent.register_kernel(("cpu", "cuda"))
def _softmax_xent_kernel(logits, target, ignore_index, label_smoothing, compute_score):
    kernels = kernels_for(logits)
    if kernels is None:
        clean = check_values(logits, target, ignore_index)
        return _torch_softmax_xent(
            logits, target, ignore_index, label_smoothing, compute_score, clean
        )
    loss, score = launch_rows(kernels, logits, target, ignore_index, label_smoothing)
    return loss, score if compute_score else logits.new_empty(0, dtype=loss.dtype)


@softmax_xent.register_fake
def _(logits, target, ignore_index, label_smoothing, compute_score):
    loss = logits.new_empty(logits.shape[:-1], dtype=out_dtype(logits))
    return loss, torch.empty_like(loss) if compute_score else loss.new_empty(0)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, _ = inputs
    ctx.save_for_backward(logits, target)
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, grad_score):
    logits, target = ctx.saved_tensors
    ignore_index, eps = ctx.ignore_index, ctx.label_smoothing
    grad_logits = grad_target = None
    if ctx.needs_input_grad[0]:
        # through the op when a graph of the backward is wanted (it differentiates again);
        # under torch.func transforms the torch path's ops, which they see through (a
        # custom op's autograd refuses them there)
        if torch._C._are_functorch_transforms_active():
            grad_fn = _torch_softmax_xent_grad
        elif torch.is_grad_enabled():
            grad_fn = softmax_xent_grad
        else:
            grad_fn = _direct(logits, softmax_xent_grad, _softmax_xent_grad_kernel)
        grad_logits = grad_fn(logits, target, ignore_index, eps, grad_loss)
    if ctx.needs_input_grad[1]:  # soft targets: dloss / dt_j = -(1 - eps) log p_j
        log_p = torch.log_softmax(logits.to(out_dtype(logits)), -1)
        grad_target = (-(1.0 - eps) * log_p * grad_loss[..., None]).to(target.dtype)
    return grad_logits, grad_target, None, None, None


softmax_xent.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# fastis::softmax_xent_grad: the backward, differentiable again


@torch.library.custom_op("fastis::softmax_xent_grad", mutates_args=())
def softmax_xent_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    grad_loss: torch.Tensor,
) -> torch.Tensor:
    """``grad_loss[r] * dloss_r / dlogits_r`` in the logits' dtype (``grad_loss`` shaped
    ``logits.shape[:-1]``)."""
    return _torch_softmax_xent_grad(logits, target, ignore_index, label_smoothing, grad_loss)


def _torch_softmax_xent_grad(logits, target, ignore_index, label_smoothing, grad_loss):
    return reference.cross_entropy_grad(
        logits, target, grad_loss, ignore_index=ignore_index, label_smoothing=label_smoothing
    )


@softmax_xent_grad.register_kernel(("cpu", "cuda"))
def _softmax_xent_grad_kernel(logits, target, ignore_index, label_smoothing, grad_loss):
    kernels = kernels_for(logits)
    if kernels is None:
        return _torch_softmax_xent_grad(logits, target, ignore_index, label_smoothing, grad_loss)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    kernels.softmax_xent(
        logits,
        target,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        grad=grad,
        grad_scale=row_scale(grad_loss, kernels),
    )
    return grad


@softmax_xent_grad.register_fake
def _(logits, target, ignore_index, label_smoothing, grad_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _grad_setup_context(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, grad_loss = inputs
    ctx.save_for_backward(logits, target, grad_loss)
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing


def _grad_backward(ctx, v):
    r"""Backward of ``g = s * (T p - t')`` (``s = grad_loss``, ``T = sum(t')``, ``t'`` the
    smoothed target) for an incoming ``v``, in torch ops (so it differentiates again):

        ``d/dz = s T (p * v - p <p, v>)``,  ``d/ds = <T p - t', v>``,
        ``d/dt = s (1 - eps) (<p, v> - v)`` (soft targets).
    """
    logits, target, grad_loss = ctx.saved_tensors
    eps = ctx.label_smoothing
    p, t, total, valid = reference.target_distribution(logits, target, ctx.ignore_index, eps)
    v = v.to(p.dtype)
    s = grad_loss.to(p.dtype)[..., None]
    pv = (p * v).sum(-1, keepdim=True)
    grad_logits = grad_target = grad_scale = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.where(valid, s * total * (p * v - p * pv), 0.0).to(logits.dtype)
    if ctx.needs_input_grad[1]:
        grad_target = (s * (1.0 - eps) * (pv - v)).to(target.dtype)
    if ctx.needs_input_grad[4]:
        grad_scale = torch.where(valid, (total * p - t) * v, 0.0).sum(-1).to(grad_loss.dtype)
    return grad_logits, grad_target, None, None, grad_scale


softmax_xent_grad.register_autograd(_grad_backward, setup_context=_grad_setup_context)


# --------------------------------------------------------------------------------------
# the eager shortcut: the same formula without the custom-op autograd layer


def _direct(tensor, op, kernel):
    """In plain eager mode on CPU and CUDA, the registered kernel itself: the dispatcher of
    a Python custom op costs tens of microseconds a call. The op elsewhere: other devices
    (meta), tensor subclasses (fake, functional), under a dispatch mode or while
    ``torch.compile`` or ``make_fx`` traces."""
    eager = (
        type(tensor) is torch.Tensor
        and (tensor.is_cpu or tensor.is_cuda)
        and not torch.compiler.is_compiling()
        and not dispatch_modes()
    )
    return kernel if eager else op


class EagerFunction(torch.autograd.Function):
    """An ``autograd.Function`` whose ``apply`` takes positional arguments only."""

    @classmethod
    def apply(cls, *args):
        # autograd.Function.apply binds the arguments to forward's signature on every call
        # (inspect.signature: about 0.2 ms, a twentieth of the demo's step). With positional
        # arguments and no defaults that binding changes nothing, so it is skipped unless a
        # torch.func transform needs the full path.
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        # torch._functorch.utils.unwrap_dead_wrappers, without its generator
        unwrap = torch._C._functorch.unwrap_if_dead
        args = [unwrap(a) if isinstance(a, torch.Tensor) else a for a in args]
        return super(torch.autograd.Function, cls).apply(*args)


class _SoftmaxXent(EagerFunction):
    @staticmethod
    def forward(logits, target, ignore_index, label_smoothing, compute_score):
        run = _direct(logits, softmax_xent, _softmax_xent_kernel)
        return run(logits, target, ignore_index, label_smoothing, compute_score)

    setup_context = staticmethod(
        lambda ctx, inputs, output: (
            _setup_context(ctx, inputs, output),
            ctx.save_for_forward(inputs[0], inputs[1]),
        )
    )
    backward = staticmethod(_backward)

    @staticmethod
    def vmap(info, in_dims, logits, target, ignore_index, label_smoothing, compute_score):
        """``torch.func.vmap``: the batched rows are more rows of the same op (every row is
        independent), with the mapped dimension moved to the front."""
        size = info.batch_size

        def front(t, dim):
            return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)

        logits, target = front(logits, in_dims[0]), front(target, in_dims[1])
        rows = logits.shape[:-1]
        soft = target.is_floating_point()
        flat_target = target.reshape(-1, target.shape[-1]) if soft else target.reshape(-1)
        loss, score = _SoftmaxXent.apply(
            logits.reshape(-1, logits.shape[-1]),
            flat_target,
            ignore_index,
            label_smoothing,
            compute_score,
        )
        score = score.reshape(rows) if compute_score else score.expand(size, 0)
        return (loss.reshape(rows), score), (0, 0)

    @staticmethod
    def jvp(ctx, d_logits, d_target, *_):
        """Forward-mode AD: ``dloss_r = <T p - t', dz_r> - (1 - eps) <log p, dt_r>``."""
        logits, target = ctx.saved_tensors
        eps = ctx.label_smoothing
        p, t, total, valid = reference.target_distribution(logits, target, ctx.ignore_index, eps)
        d_loss = torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device)
        if d_logits is not None:
            grad = torch.where(valid, total * p - t, 0.0)
            d_loss = d_loss + (grad * d_logits.to(p.dtype)).sum(-1)
        if d_target is not None:
            log_p = torch.log_softmax(logits.to(p.dtype), -1)
            d_loss = d_loss - (1.0 - eps) * (log_p * d_target.to(p.dtype)).sum(-1)
        return d_loss, None


def softmax_xent_autograd(
    logits, target, ignore_index: int, label_smoothing: float, compute_score: bool
):
    """``(loss, score, clean)``: ``softmax_xent`` with its gradient, and what the class
    indices were found to be where this call read them (the CPU's torch path in eager
    mode: True when all are in ``[0, C)`` and none is ``ignore_index``), else None.

    The op under ``torch.compile``; on devices and backends other than the CPU's torch
    path, the same formula through ``_SoftmaxXent`` (whose kernel checks the indices); on
    the CPU's torch path in eager mode, torch's own cross-entropy with its autograd. The
    last is the torch path itself, not another formula: ``F.cross_entropy`` is what the
    torch path computes for the loss and its gradient, and its autograd is several times
    cheaper than any composition (fwd + bwd at 128 x 10: 94 against 490 us measured),
    which small models feel in every step. Its double backward and forward AD are
    torch's; ``reference.cross_entropy_rows`` adds fastis's rules for ``+inf`` logits and
    ignored rows, and ``reference.score_rows`` gives the score of class indices in a few
    ops."""
    if torch.compiler.is_compiling():
        return (*softmax_xent(logits, target, ignore_index, label_smoothing, compute_score), None)
    eager_cpu = (
        type(logits) is torch.Tensor
        and logits.is_cpu
        and logits.shape[-1] > 0
        and not dispatch_modes()
        and not torch._C._are_functorch_transforms_active()  # torch.func: the vmap rule
        and kernels_for(logits) is None
    )
    if not eager_cpu:
        loss, score = _SoftmaxXent.apply(
            logits, target, ignore_index, label_smoothing, compute_score
        )
        return loss, score, None
    clean = check_values(logits, target, ignore_index)
    if compute_score and not label_smoothing and clean is not None:
        # checked class indices (out of range raised): one log_softmax for both
        loss, score = reference.cross_entropy_score_rows(
            logits, target, ignore_index=ignore_index, clean=clean
        )
        return loss, score, clean
    loss = reference.cross_entropy_rows(
        logits,
        target,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        clean=bool(clean),
    )
    if not compute_score:
        return loss, loss.new_empty(0), clean
    with torch.no_grad():
        _, score, _ = reference.softmax_xent(
            logits.detach(),
            target.detach(),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
    return loss, score, clean


# --------------------------------------------------------------------------------------
# helpers


def count_rows(target: torch.Tensor, logits: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of rows (tokens) that count in a mean, as a tensor (no synchronisation)."""
    dtype = out_dtype(logits)
    if target.is_floating_point():
        # a fill, not a host-to-device copy: stays capturable in a CUDA graph
        return torch.full((), float(logits.shape[:-1].numel()), dtype=dtype, device=logits.device)
    return (target != ignore_index).sum().to(dtype)


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> bool:
    """Raises for class indices outside ``[0, C)`` other than ``ignore_index``; returns
    True when every index is in ``[0, C)`` and none is ``ignore_index`` ("clean")."""
    if target.numel() == 0:
        return True
    # one reduction and one read in the common case; the exact rule only when it fails
    lo, hi = _min_max(target)
    if 0 <= lo and hi < num_classes:
        return not lo <= ignore_index <= hi
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        value = target[bad][0].item()
        raise ValueError(
            f"target contains class index {value}, outside [0, {num_classes}) "
            f"and not ignore_index={ignore_index}"
        )
    return False


def _min_max(t: torch.Tensor) -> tuple:
    """``(min, max)`` of a non-empty CPU tensor as Python numbers (one op, one read)."""
    lo, hi = torch.aminmax(t)
    return lo.item(), hi.item()
