"""Eval mode for the scoring pass, without ``nn.Module.train``'s cost.

``model.eval()`` then ``model.train()`` walks the module tree twice and sets
``training`` through ``nn.Module.__setattr__`` (which looks the name up among the
parameters, buffers and submodules first): on the demo's ten-module CNN about 50 us per
scoring pass, several times that inside a training step whose caches the backward pass
has just evicted, and more than the sampler's own work. ``eval_mode(model)`` does the
same with one walk of the tree per pass (so submodules added or replaced since the last
pass are seen) and a plain write of each module's ``training`` flag, which is exactly what
``nn.Module.train`` itself does for a module that does not override it.

Where a module of the tree does override ``train`` or ``__setattr__``, or keeps
``training`` anywhere but its instance dict (a scripted or compiled module, say), that
module's own code must run: the whole tree then goes through ``model.eval()`` and
``model.train()`` as before.

Each module gets its own mode back: a submodule the caller had put in eval mode (a frozen
BatchNorm, say) stays in eval mode, where ``model.train()`` would have switched it back.
"""

from contextlib import contextmanager

import torch

_TRAIN = torch.nn.Module.train
_SETATTR = torch.nn.Module.__setattr__


def _plain(module: torch.nn.Module) -> bool:
    """Whether setting ``module.__dict__['training']`` is all ``module.train(mode)`` does
    to ``module`` itself (the recursion aside)."""
    kind = type(module)
    return (
        kind.train is _TRAIN
        and kind.__setattr__ is _SETATTR
        and getattr(kind, "training", None) is None  # no class-level property or value
        and "training" in module.__dict__
    )


def _collect(module: torch.nn.Module, out: list) -> bool:
    """Appends ``module`` and its submodules, depth first (a shared one once per place it
    appears, as ``nn.Module.train`` visits them); False as soon as one is not plain."""
    if not _plain(module):
        return False
    out.append(module)
    for child in module._modules.values():
        if child is not None and not _collect(child, out):
            return False
    return True


@contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` (an ``nn.Module``) with every module in eval mode inside the block, and
    each module's own mode restored after it (also when the block raises)."""
    modules: list = []
    if not _collect(model, modules):  # some module's own train() must run
        if not model.training:
            yield
            return
        model.eval()
        try:
            yield
        finally:
            model.train()
        return
    flags = [m.__dict__["training"] for m in modules]  # all read before any is changed
    if not any(flags):
        yield
        return
    for m in modules:
        m.__dict__["training"] = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.__dict__["training"] = flag
