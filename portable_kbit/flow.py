"""Forward hooks that keep dtypes consistent once some norms are fp32.

Two rules, both explicit rather than left to dtype promotion inside each architecture's norm:
- an upcast norm computes in its (fp32) weight dtype and hands on fp32 ("fp32" activations, peft's numerics) or its
  original dtype ("native", the lowest activation memory);
- a consumer whose kernel wants its input in its weight dtype (nn.Linear such as lm_head, Conv1D, LayerNorm, an
  optimum-quanto layer, adapted or not) computes in that dtype and returns the dtype it was given, as bitsandbytes
  layers already do, so the flow stays the same on every quantizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style transposed linear

from .models import weight_of
from .quantized import handles_its_own_input_dtype

HALF_DTYPES = (torch.float16, torch.bfloat16)
#: activations modes in which adapted layers compute in fp32 (the upcast norms hand fp32 on)
FP32_FLOWS = ("fp32", "layer")

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
    """Hooks for one upcast norm: input cast to the dtype it computes in, output cast to the flow dtype.

    The compute dtype is fp32 for a norm computed in fp32 at call time, else (None) its weight's dtype at call time
    (fp32 once its parameters were cast).
    """

    def __init__(self, flow_dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> None:
        self.flow_dtype = flow_dtype
        self.compute_dtype = compute_dtype

    def before(self, module: nn.Module, args: tuple) -> tuple | None:
        x = _first_tensor(args)
        dtype = self.compute_dtype or _weight_dtype(module)
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


Forward = Callable[..., Any]


def _override_of(forward: Forward | None) -> ForwardOverride | None:
    handle = getattr(forward, "override", None)
    return handle if isinstance(handle, ForwardOverride) else None


class ForwardOverride:
    """An instance-level forward (a removable handle, like a hook's): removing it restores what was there before.

    `make_forward(call_previous)` builds the new forward around the one it replaces: an instance forward that was
    there (accelerate's device hooks, another override of this call), else the class's. An override of an earlier
    prepare() that this call supersedes (`superseded`) is skipped: the new one wraps what that one wrapped.
    """

    def __init__(self, module: nn.Module, make_forward: Callable[[Forward], Forward]) -> None:
        self.module = module
        self.superseded = False
        current = module.__dict__.get("forward")
        while (older := _override_of(current)) is not None and older.superseded:
            current = older.previous
        self.previous: Forward | None = current
        call_previous = current if current is not None else type(module).forward.__get__(module)
        forward = make_forward(call_previous)
        forward.override = self  # type: ignore[attr-defined]  # a function attribute: finds this handle again
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


def _fp32_linear_forward(module: nn.Module, chunk_bytes: int, cast_input: bool) -> Callable[[Forward], Forward]:
    """lm_head in fp32 from its half-precision weight; `cast_input`: a half-precision input is computed in fp32 too
    ("layer" mode, whose stream between blocks is half precision), giving fp32 logits as in "fp32" mode."""

    def make(call_previous: Forward) -> Forward:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            weight = weight_of(module)
            if cast_input and x.dtype in HALF_DTYPES:
                x = x.float()
            if x.dtype == torch.float32 and weight.dtype != torch.float32 and not weight.requires_grad:
                rows = max(1, chunk_bytes // (4 * weight.shape[1]))
                return FrozenLinearInFp32.apply(x, weight, getattr(module, "bias", None), rows)
            if x.is_floating_point() and x.dtype != weight.dtype:  # as InputDtypeGuard: compute in the weight dtype
                return call_previous(x.to(weight.dtype), *args, **kwargs).to(x.dtype)
            return call_previous(x, *args, **kwargs)

        return forward

    return make


@contextlib.contextmanager
def parameters_in_fp32(module: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """For the duration of one call, the module's half-precision tensors `names` read as fp32 copies.

    A bf16/fp16 value is exact in fp32, so the norm computes exactly as with an fp32 parameter, without one: no new
    bytes between calls and no dtype change that a wrapper (FSDP), a checkpoint or an optimizer can see. Each name is
    swapped where attribute lookup finds it: the instance `__dict__` first (FSDP1 sets the unsharded views there
    during forward, keeping the sharded parameter in `_parameters`), else `_parameters`.
    """
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for name in names:
            stores: tuple[dict[str, Any], ...] = (module.__dict__, module._parameters)
            for store in stores:
                value = store.get(name)
                if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
                    store[name] = value.float()
                    swapped.append((store, name, value))
                    break
        yield
    finally:
        for store, name, value in reversed(swapped):
            store[name] = value


def _fp32_compute_forward(module: nn.Module) -> Callable[[Forward], Forward]:
    names = [name for name, p in module._parameters.items() if p is not None and p.is_floating_point()]

    def make(call_previous: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            with parameters_in_fp32(module, names):
                return call_previous(*args, **kwargs)

        return forward

    return make


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of "layer" mode: transformers' gradient-checkpointed layers (the decoder layers); for a model without
    that class, the modules of its longest nn.ModuleList (the layer stack)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers: list[nn.Module] = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    except ImportError:  # transformers before the class existed
        layers = []
    if layers:
        return layers
    longest: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(longest):
            longest = list(module)
    return longest


def _block_output_to(dtype: torch.dtype) -> Callable[[nn.Module, tuple, Any], Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        y = _first_tensor(output)
        if y is None or y.dtype != torch.float32:
            return None
        return _replace_first(output, y.to(dtype))

    return hook


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
    compute_norms: Sequence[nn.Module] = (),
    blocks: Sequence[nn.Module] = (),
) -> list:
    """Register the hooks; returns their handles (removing them, newest first, restores the original forwards).

    Norms in `compute_norms` compute in fp32 at call time from their half-precision parameters. With "fp32"
    activations the embedding output is fp32 too (as with peft, whose embedding weight is fp32: the residual stream
    and the rotary cos/sin follow its dtype), and a frozen half-precision nn.Linear consumer (lm_head) computes in fp32
    block by block instead of rounding its input and output to bf16. With "layer" activations the upcast norms hand
    fp32 on inside each block (`blocks`), whose output is cast back to the model's dtype: the stream between blocks
    and the checkpointed block inputs stay half precision; lm_head computes in fp32 as in "fp32" mode.
    """
    handles: list = []
    fp32_inside = activations in FP32_FLOWS and bool(upcast_norms)
    compute = {id(m) for m in compute_norms}
    for norm, original_dtype in upcast_norms.items():
        in_fp32 = id(norm) in compute
        flow = UpcastNormFlow(torch.float32 if fp32_inside else original_dtype, torch.float32 if in_fp32 else None)
        handles.append(norm.register_forward_pre_hook(flow.before))
        handles.append(norm.register_forward_hook(flow.after))
        if in_fp32:
            handles.append(ForwardOverride(norm, _fp32_compute_forward(norm)))
    if fp32_inside and activations == "fp32" and input_embeddings is not None:
        handles.append(input_embeddings.register_forward_hook(_embedding_output_to_fp32))
    if fp32_inside and activations == "layer":
        native = next(iter(upcast_norms.values()))
        for block in blocks:
            handles.append(block.register_forward_hook(_block_output_to(native)))
    for module in consumers:
        if fp32_inside and computes_in_fp32(module):
            cast_input = activations == "layer"
            handles.append(ForwardOverride(module, _fp32_linear_forward(module, chunk_bytes, cast_input)))
            continue
        guard = InputDtypeGuard()
        handles.append(module.register_forward_pre_hook(guard.before))
        handles.append(module.register_forward_hook(guard.after))
    return handles
