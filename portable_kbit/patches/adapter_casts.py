"""One cast of each adapter input, shared by every LoRA layer that reads it: peft casts a layer's input to its
adapter's dtype in each LoRA layer on its own, so q, k and v (and gate and up) each keep a copy of the same input.

With fp32 adapters (peft's default) on a model whose hidden states stay bf16 (``activations="native"``), every
adapted projection saves an fp32 copy of its input for the adapter's weight gradient: three copies of the same
normed hidden states for q/k/v, two for gate/up, each twice the size of the bf16 input. Sharing one copy gives the
same values and gradients (autograd sums the adapters' gradients into the one copy) for a third of the memory.

peft's LoRA layers are usually created after prepare() (``get_peft_model``), around the modules prepare() saw. So
the patch registers those modules, and peft's ``LoraLayer._cast_input_dtype`` is replaced once per process by a
function that asks the registry about the layer's base layer: a LoRA layer around a registered module casts through
its model's memo, any other exactly as peft does. Nothing on the model changes at call time, and the recompute of a
checkpointed layer shares as the forward does. The memo keeps a copy as long as its source tensor lives (weak keys)
and casts a source changed in place again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from .protocol import Patch

#: the LoraLayer method peft casts adapter inputs with (peft >= 0.15; absent before, and then nothing is shared)
CAST_METHOD = "_cast_input_dtype"
#: a module prepare() saw -> the memo of its model's patch
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, SharedCasts] = weakref.WeakKeyDictionary()
#: peft's own method, kept when ours replaces it (empty until then)
_PEFT_CAST: list[Callable[..., Any]] = []


class SharedCasts:
    """The memo: source tensor -> (its version, grad mode, {dtype: copy}); counts the casts it saved."""

    def __init__(self) -> None:
        self.copies: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.shared = 0

    def cast(self, x: torch.Tensor | None, dtype: torch.dtype, enabled: bool = True) -> torch.Tensor | None:
        if x is None or x.dtype == dtype or not enabled:
            return x  # as peft: nothing to cast, or casting switched off (peft.helpers.disable_input_dtype_casting)
        state = (x._version, torch.is_grad_enabled())
        entry = self.copies.get(x)
        if entry is None or entry[0] != state:
            entry = (state, {})
            self.copies[x] = entry
        copies: dict[torch.dtype, torch.Tensor] = entry[1]
        if dtype in copies:
            self.shared += 1
            return copies[dtype]
        copies[dtype] = copy = x.to(dtype=dtype)
        return copy


def lora_layer_class() -> type | None:
    """peft's LoraLayer where it has the cast method this patch shares, else None."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return None
    return LoraLayer if hasattr(LoraLayer, CAST_METHOD) else None


def _cast_input_dtype(self: Any, x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """LoraLayer._cast_input_dtype: through the memo of the model prepare() registered the base layer for."""
    memo = _REGISTRY.get(self.get_base_layer())
    if memo is None:
        return _PEFT_CAST[0](self, x, dtype)
    return memo.cast(x, dtype, getattr(self, "cast_input_dtype_enabled", True))


def _replace_peft_cast() -> bool:
    """Put _cast_input_dtype on peft's LoraLayer (once per process); False where this peft has no such method."""
    kind = lora_layer_class()
    if kind is None:
        return False
    if not _PEFT_CAST:
        _PEFT_CAST.append(getattr(kind, CAST_METHOD))
        setattr(kind, CAST_METHOD, _cast_input_dtype)
    return True


class ShareAdapterCasts(Patch):
    """Registers `modules` (those adapters may wrap) with one memo: their LoRA layers share casts of an input."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.memo = SharedCasts()

    def apply(self) -> None:
        if _replace_peft_cast():
            for module in self.modules:
                _REGISTRY[module] = self.memo

    def remove(self) -> None:
        for module in self.modules:
            if _REGISTRY.get(module) is self.memo:
                del _REGISTRY[module]
