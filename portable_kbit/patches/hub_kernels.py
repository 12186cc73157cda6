"""transformers' hub kernels and prepare()'s instance forwards.

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
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .dtype_flow import AttributeOverride, ForwardOverride, rewrap_replaced

KERNELIZING_METHODS = ("set_use_kernels", "reset_kernels")


def follow_kernelization(hf_model: nn.Module, overrides: Sequence[ForwardOverride]) -> list[AttributeOverride]:
    """Instance wrappers of the model's kernelizing methods (those its class has) that keep `overrides` in place;
    removable handles. Empty where there is nothing to keep or the transformers version does not kernelize."""
    if not overrides:
        return []
    kept = list(overrides)
    handles = []
    for name in KERNELIZING_METHODS:
        if callable(getattr(type(hf_model), name, None)):
            handles.append(AttributeOverride(hf_model, name, _keeping(hf_model, name, kept)))
    return handles


def _keeping(hf_model: nn.Module, name: str, overrides: list[ForwardOverride]) -> Callable[..., Any]:
    @functools.wraps(getattr(type(hf_model), name))
    def method(*args: Any, **kwargs: Any) -> Any:
        replaced = getattr(method, "replaced", None)  # set by AttributeOverride: an instance method it wraps
        # else the class's, looked up at call time (as ForwardOverride's: a wrapper may swap the class)
        original = replaced if callable(replaced) else functools.partial(getattr(type(hf_model), name), hf_model)
        try:
            return original(*args, **kwargs)
        finally:  # a kernelization that failed halfway may have replaced some forwards already
            rewrap_replaced(overrides)

    return method
