"""One cast of each adapter input, shared by every LoRA layer that reads it: peft casts a layer's input to its
adapter's dtype in each LoRA layer on its own, so q, k and v (and gate and up) each keep a copy of the same input.

With fp32 adapters (peft's default) on a model whose hidden states stay bf16 (``activations="native"``), every
adapted projection saves an fp32 copy of its input for the adapter's weight gradient: three copies of the same
normed hidden states for q/k/v, two for gate/up, each twice the size of the bf16 input. Sharing one copy gives the
same values and gradients (autograd sums the adapters' gradients into the one copy) for a third of the memory.

peft's LoRA layers are usually created after prepare() (``get_peft_model``), so the patch is a forward pre-hook on
the model that gives each LoRA layer it finds, at each call, an instance ``_cast_input_dtype`` drawing from a memo:
the copy lives as long as its source tensor (weak keys), and a source changed in place since is cast again.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from .protocol import Patch

#: the instance attribute peft looks up for the cast (peft >= 0.15; absent before, and then nothing is shared)
CAST_METHOD = "_cast_input_dtype"


def lora_layer_class() -> type | None:
    """peft's LoraLayer where it has the cast method this patch shares, else None."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return None
    return LoraLayer if hasattr(LoraLayer, CAST_METHOD) else None


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


class ShareAdapterCasts(Patch):
    """A forward pre-hook on `model` that points every peft LoRA layer inside at one SharedCasts memo."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.memo = SharedCasts()
        self.handle: Any = None
        self.layers: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def apply(self) -> None:
        self.handle = self.model.register_forward_pre_hook(self._share)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        for layer in list(self.layers):
            if getattr(layer.__dict__.get(CAST_METHOD), "__self__", None) is self:
                del layer.__dict__[CAST_METHOD]
        self.layers = weakref.WeakSet()

    def _share(self, module: nn.Module, args: Any) -> None:
        kind = lora_layer_class()
        if kind is None:
            return
        for layer in self.model.modules():
            if isinstance(layer, kind) and CAST_METHOD not in layer.__dict__:
                layer.__dict__[CAST_METHOD] = _Bound(self, layer)
                self.layers.add(layer)


class _Bound:
    """``layer._cast_input_dtype(x, dtype)`` answered from the patch's memo (``__self__``: the patch, for remove())."""

    def __init__(self, patch: ShareAdapterCasts, layer: nn.Module) -> None:
        self.__self__ = patch
        self.layer = weakref.ref(layer)

    def __call__(self, x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        enabled = getattr(self.layer(), "cast_input_dtype_enabled", True)
        return self.__self__.memo.cast(x, dtype, enabled)
