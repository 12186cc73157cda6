"""Forward hooks that keep dtypes consistent once some norms are fp32.

Two rules, both explicit rather than left to dtype promotion inside each architecture's norm:
- an upcast norm computes in its (fp32) weight dtype and hands on fp32 ("fp32" activations, peft's numerics) or its
  original dtype ("native", the lowest activation memory);
- a consumer whose kernel wants its input in its weight dtype (nn.Linear such as lm_head, Conv1D, LayerNorm, an
  optimum-quanto layer, adapted or not) computes in that dtype and returns the dtype it was given, as bitsandbytes
  layers already do, so the flow stays the same on every quantizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style transposed linear

from .models import weight_of
from .quantized import handles_its_own_input_dtype

STRICT_TYPES: tuple[type, ...] = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Conv1d, nn.Conv2d, Conv1D)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:])) if isinstance(value, tuple) else [tensor, *value[1:]]


def _weight_dtype(module: nn.Module) -> torch.dtype | None:
    weight = getattr(module, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point else None


def _compute_dtype(module: nn.Module) -> torch.dtype | None:
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

    def before(self, module: nn.Module, args: tuple) -> tuple | None:
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
        self.pending: list[torch.dtype | None] = []

    def before(self, module: nn.Module, args: tuple) -> tuple | None:
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
    return (isinstance(module, STRICT_TYPES) and _weight_dtype(module) is not None) or _compute_dtype(
        module
    ) is not None


class FrozenLinearInFp32(torch.autograd.Function):
    """y = x W^T + b in fp32 for a frozen fp16/bf16 W without an fp32 copy of W: the weight is upcast one block of
    rows at a time, in the forward and again in the backward (only the half-precision parameter is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.rows = rows
        out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
        if x.numel() == 0:  # no tokens (the stand-in call of token blocks): no weight block to upcast
            return out
        for start in range(0, weight.shape[0], rows):
            out[..., start : start + rows] = torch.nn.functional.linear(x, weight[start : start + rows].float())
        if bias is not None:
            out += bias.float()
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros(*grad_out.shape[:-1], weight.shape[1], dtype=torch.float32, device=grad_out.device)
            for start in range(0, weight.shape[0], ctx.rows):
                grad_x += grad_out[..., start : start + ctx.rows] @ weight[start : start + ctx.rows].float()
        return grad_x, None, None, None


class ForwardOverride:
    """An instance-level forward (a removable handle, like a hook's): removing it restores what was there before."""

    def __init__(self, module: nn.Module, forward: Any) -> None:
        self.module = module
        current = module.__dict__.get("forward")
        # Replacing an override of an earlier prepare(): restore what was there before that one, not it.
        self.previous = getattr(current, "replaced", current)
        forward.replaced = self.previous
        self.forward = forward
        module.__dict__["forward"] = forward

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.forward:
            return  # a later override replaced this one and restores the original itself
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.previous


def computes_in_fp32(module: nn.Module) -> bool:
    """A plain nn.Linear with a frozen half-precision weight (lm_head): it can take fp32 in and give fp32 out."""
    weight = getattr(module, "weight", None)
    return (
        type(module).forward is nn.Linear.forward
        and isinstance(weight, torch.Tensor)
        and type(weight) in (nn.Parameter, torch.Tensor)
        and weight.dtype in (torch.float16, torch.bfloat16)
        and not weight.requires_grad
    )


def _fp32_linear_forward(module: nn.Module, chunk_bytes: int):
    original = type(module).forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        weight = weight_of(module)
        if x.dtype == torch.float32 and weight.dtype != torch.float32 and not weight.requires_grad:
            rows = max(1, chunk_bytes // (4 * weight.shape[1]))
            return FrozenLinearInFp32.apply(x, weight, getattr(module, "bias", None), rows)
        if x.is_floating_point() and x.dtype != weight.dtype:  # as InputDtypeGuard: compute in the weight's dtype
            return original(module, x.to(weight.dtype), *args, **kwargs).to(x.dtype)
        return original(module, x, *args, **kwargs)

    return forward


def _embedding_output_to_fp32(module: nn.Module, args: tuple, output: Any) -> Any:
    return (
        output.float()
        if isinstance(output, torch.Tensor) and output.dtype in (torch.float16, torch.bfloat16)
        else None
    )


def install(
    upcast_norms: dict[nn.Module, torch.dtype],
    consumers: list[nn.Module],
    activations: str,
    input_embeddings: nn.Module | None = None,
    chunk_bytes: int = 64 << 20,
) -> list:
    """Register the hooks; returns their handles (removing them restores the original forward).

    With "fp32" activations the embedding output is fp32 too (as with peft, whose embedding weight is fp32: the
    residual stream and the rotary cos/sin follow its dtype), and a frozen half-precision nn.Linear consumer
    (lm_head) computes in fp32 block by block instead of rounding its input and output to bf16.
    """
    handles: list = []
    for norm, original_dtype in upcast_norms.items():
        flow = UpcastNormFlow(torch.float32 if activations == "fp32" else original_dtype)
        handles.append(norm.register_forward_pre_hook(flow.before))
        handles.append(norm.register_forward_hook(flow.after))
    fp32_flow = activations == "fp32" and bool(upcast_norms)
    if fp32_flow and input_embeddings is not None:
        handles.append(input_embeddings.register_forward_hook(_embedding_output_to_fp32))
    for module in consumers:
        if fp32_flow and computes_in_fp32(module):
            handles.append(ForwardOverride(module, _fp32_linear_forward(module, chunk_bytes)))
            continue
        guard = InputDtypeGuard()
        handles.append(module.register_forward_pre_hook(guard.before))
        handles.append(module.register_forward_hook(guard.after))
    return handles
