"""Typed access to the transformers / peft model methods the pipeline calls.

prepare() takes any ``nn.Module`` (a ``PreTrainedModel`` or a ``PeftModel``), and torch types ``Module.__getattr__``
as ``Tensor | Module``: these helpers say what each call returns, in one place, instead of a cast at every call site.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def set_training_flags(modules: Iterable[nn.Module]) -> None:
    """Every module's ``training`` flag set, as ``model.train()`` sets them, without calling it: from transformers
    5.25, ``PreTrainedModel.train()`` re-kernelizes a model loaded with ``use_kernels`` (a bitsandbytes model is, when
    the ``kernels`` package is installed), which swaps layer forwards: a lasting change a trace or a forecast must not
    make. ``modules``: ``model.modules()``, or an index's modules (no recursion). The caller restores the flags."""
    for module in modules:
        module.training = True


def is_peft_model(model: nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model: a PeftModel's base model, else `model` itself."""
    base: nn.Module = call(model, "get_base_model") if is_peft_model(model) else model
    return base


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """`get_input_embeddings()` where the model has one, else None."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        embeddings = getter()
    except (AttributeError, NotImplementedError):
        return None
    return embeddings if isinstance(embeddings, nn.Module) else None


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """`get_output_embeddings()` (the head) where the model has one, else None."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        head = getter()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def loss_function(model: nn.Module) -> Callable[..., Any] | None:
    """transformers' ``loss_function`` of a model (the settable one of ``PreTrainedModel``), or None."""
    function = getattr(model, "loss_function", None)
    return function if callable(function) else None


def weight_of(module: nn.Module) -> torch.Tensor:
    """A module's `weight` tensor; TypeError when it has none (a caller that knows better gets a clear error)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """transformers' gradient checkpointing: ``activation_checkpointing_enable`` from transformers 5.24, whose old
    name ``gradient_checkpointing_enable`` now warns (removal announced for v6); the old name before 5.24."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(kwargs))
    else:
        call(model, "gradient_checkpointing_enable", gradient_checkpointing_kwargs=dict(kwargs))


def is_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on (``is_activation_checkpointing`` from 5.24)."""
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def call(model: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a transformers/peft method by name (enable_input_require_grads ...), typed as returning Any."""
    return getattr(model, method)(*args, **kwargs)
