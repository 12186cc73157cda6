"""Forward hooks that keep dtypes consistent once some norms are fp32.

Two rules, both explicit rather than left to dtype promotion inside each architecture's norm:
- an upcast norm computes in its (fp32) weight dtype and hands on fp32 ("fp32" activations, peft's numerics) or its
  original dtype ("native", the lowest activation memory);
- a consumer whose kernel wants its input in its weight dtype (nn.Linear such as lm_head, Conv1D, LayerNorm, an
  optimum-quanto layer, adapted or not) computes in that dtype and returns the dtype it was given, as bitsandbytes
  layers already do, so the flow stays the same on every quantizer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

try:  # GPT-2 style transposed linear
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

from .quantized import handles_its_own_input_dtype

STRICT_TYPES: tuple[type, ...] = tuple(
    t for t in (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Conv1d, nn.Conv2d, Conv1D) if t is not None
)


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:])) if isinstance(value, tuple) else [tensor, *value[1:]]


def _weight_dtype(module: nn.Module) -> Optional[torch.dtype]:
    weight = getattr(module, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point else None


def _compute_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """A leaf layer with quantized (integer) weights that dequantizes to a `compute_dtype` (HQQLinear and the like):
    its matmul needs the input in that dtype."""
    dtype = getattr(module, "compute_dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or any(True for _ in module.children()):
        return None
    quantized = any(not p.dtype.is_floating_point for p in module.parameters(recurse=False))
    return dtype if quantized else None


class UpcastNormFlow:
    """Hooks for one upcast norm: input cast to the weight's dtype, output cast to the flow dtype."""

    def __init__(self, flow_dtype: torch.dtype) -> None:
        self.flow_dtype = flow_dtype

    def before(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        x = _first_tensor(args)
        dtype = _weight_dtype(module)
        if x is None or dtype is None or not x.is_floating_point() or x.dtype == dtype:
            return None
        return _replace_first(args, x.to(dtype))

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        y = _first_tensor(output)
        if y is None or not y.is_floating_point() or y.dtype == self.flow_dtype:
            return None
        return _replace_first(output, y.to(self.flow_dtype))


class InputDtypeGuard:
    """Hooks for a dtype-strict consumer: compute in the weight dtype, return the caller's dtype."""

    def __init__(self) -> None:
        self.pending: list[Optional[torch.dtype]] = []

    def before(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        x = _first_tensor(args)
        dtype = _weight_dtype(module) or _compute_dtype(module)
        if x is None or dtype is None or not x.is_floating_point() or x.dtype == dtype:
            self.pending.append(None)
            return None
        self.pending.append(x.dtype)
        return _replace_first(args, x.to(dtype))

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        caller_dtype = self.pending.pop() if self.pending else None
        y = _first_tensor(output)
        if caller_dtype is None or y is None or not y.is_floating_point():
            return None
        return _replace_first(output, y.to(caller_dtype))


def is_strict_consumer(module: nn.Module) -> bool:
    """A layer whose kernel fails (or silently misbehaves) on an input dtype other than its weight's."""
    if handles_its_own_input_dtype(module):
        return False
    return (isinstance(module, STRICT_TYPES) and _weight_dtype(module) is not None) or _compute_dtype(module) is not None


def install(
    upcast_norms: dict[nn.Module, torch.dtype], consumers: list[nn.Module], activations: str
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the hooks; returns their handles (removing them restores the original forward)."""
    handles = []
    for norm, original_dtype in upcast_norms.items():
        flow = UpcastNormFlow(torch.float32 if activations == "fp32" else original_dtype)
        handles.append(norm.register_forward_pre_hook(flow.before))
        handles.append(norm.register_forward_hook(flow.after))
    for module in consumers:
        guard = InputDtypeGuard()
        handles.append(module.register_forward_pre_hook(guard.before))
        handles.append(module.register_forward_hook(guard.after))
    return handles
