"""prepare()'s instance forwards kept through transformers' hub-kernel kernelization (train(), eval()).

From transformers 5.25 (which depends on the ``kernels`` package), ``from_pretrained`` kernelizes a model by default
(``use_kernels=True``), and ``PreTrainedModel.train()`` / ``eval()`` kernelize it again whenever the kernel mode
changes. ``kernels.kernelize`` sets or removes the instance ``forward`` of every module whose class carries a hub
kernel name (the RMSNorm of some 130 model types): the forwards prepare() put there (a frozen norm computing in fp32,
a blocked MLP) are dropped, and training silently runs without them.

The model's own entry points to kernelization, ``set_use_kernels`` (what ``train()``, ``eval()`` and the
``use_kernels`` / ``kernels_mode`` setters go through) and ``reset_kernels``, are given instance wrappers that call the
original, then wrap prepare()'s forwards again around whatever the kernelization put there. A ``kernels.kernelize``
called directly on the model is not seen: prepare() again after it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch import nn

from .protocol import InstanceAttribute, InstanceForward

KERNELIZING_METHODS = ("set_use_kernels", "reset_kernels")


def follow_kernelization(hf_model: nn.Module, forwards: Sequence[InstanceForward]) -> list[InstanceAttribute]:
    """Instance wrappers of the model's kernelizing methods (those its class has) that keep `forwards` in place, as
    patches to apply. None where there is nothing to keep or the transformers version does not kernelize."""
    if not forwards:
        return []
    kept = list(forwards)
    return [
        _rewrapping(hf_model, name, kept)
        for name in KERNELIZING_METHODS
        if callable(getattr(type(hf_model), name, None))
    ]


def _rewrapping(hf_model: nn.Module, name: str, forwards: list[InstanceForward]) -> InstanceAttribute:
    """The method `name` as an instance attribute: what it replaced (an instance method), else the class's, looked up
    at call time (a wrapper may swap the class), then `forwards` put back around whatever it left."""
    patch = InstanceAttribute(hf_model, name, None)

    @functools.wraps(getattr(type(hf_model), name))
    def method(*args: Any, **kwargs: Any) -> Any:
        replaced = patch.previous
        original = replaced if callable(replaced) else functools.partial(getattr(type(hf_model), name), hf_model)
        try:
            return original(*args, **kwargs)
        finally:  # a kernelization that failed halfway may have replaced some forwards already
            rewrap_replaced(forwards)

    patch.value = method
    return patch


def rewrap_replaced(forwards: Sequence[InstanceForward]) -> None:
    """Put back the forwards whose module's instance forward was replaced from outside, in the order they were
    applied (one wrapping another stays so); a module whose newest one still stands is left alone."""
    by_module: dict[nn.Module, list[InstanceForward]] = {}
    for forward in forwards:
        by_module.setdefault(forward.module, []).append(forward)
    for stack in by_module.values():
        if not stack[-1].is_live():
            for forward in stack:
                forward.apply()  # wraps what stands there now
