"""fp32 computation from half-precision weights, without fp32 copies of them: a frozen lm_head block by block
(FrozenLinearInFp32, from bf16 matmuls where the backend has them), a norm with its parameters read as fp32 for the
duration of one call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..constants import HALF_DTYPES
from ..model.hf import weight_of
from .protocol import Forward


def bf16_parts(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fp32 `x` as three bf16 tensors whose sum is `x` exactly, smallest first: fp32's 24 significand bits are three
    times bf16's 8, each rounding's remainder is exact in fp32, and bf16 has fp32's exponent range (values beyond
    bf16's largest, 3.39e38, would become inf; subnormal remainders below 2**-126 can be lost)."""
    high = x.to(torch.bfloat16)
    rest = x - high.float()
    middle = rest.to(torch.bfloat16)
    return (rest - middle.float()).to(torch.bfloat16), middle, high


def matmul_from_bf16_parts(parts: Sequence[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """x @ weight in fp32 from x's bf16_parts (2-D) and a bf16 `weight`: one bf16 matmul per part, each writing its
    fp32 accumulator (``out_dtype``). A product of two bf16 values is exact in fp32, so this is the fp32 product up
    to the order of the additions, at bf16 tensor-core speed (fp32 matmuls run without them)."""
    out = torch.mm(parts[0], weight, out_dtype=torch.float32)
    for part in parts[1:]:
        out += torch.mm(part, weight, out_dtype=torch.float32)
    return out


class FrozenLinearInFp32(torch.autograd.Function):
    """y = x W^T + b in fp32 for a frozen fp16/bf16 W without an fp32 copy of W, one block of rows at a time in the
    forward and again in the backward (only the half-precision parameter is saved). `from_bf16_parts`: each block's
    fp32 product as matmul_from_bf16_parts (a bf16 W, where the backend's matmuls can write fp32); else the block of
    W is upcast and multiplied in fp32."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, from_bf16_parts: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.rows, ctx.from_bf16_parts = rows, from_bf16_parts
        out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
        if x.numel() == 0:  # no tokens (the stand-in call of token blocks): no weight block to upcast
            return out
        parts = bf16_parts(x.reshape(-1, x.shape[-1])) if from_bf16_parts else ()
        for start in range(0, weight.shape[0], rows):
            block = weight[start : start + rows]
            if from_bf16_parts:
                out[..., start : start + rows] = matmul_from_bf16_parts(parts, block.t()).view(*x.shape[:-1], -1)
            else:
                out[..., start : start + rows] = torch.nn.functional.linear(x, block.float())
        if bias is not None:
            out += bias.float()
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros(*grad_out.shape[:-1], weight.shape[1], dtype=torch.float32, device=grad_out.device)
            flat, flat_grads = grad_x.view(-1, weight.shape[1]), grad_out.reshape(-1, weight.shape[0])
            for start in range(0, weight.shape[0], ctx.rows):
                block = weight[start : start + ctx.rows]
                if ctx.from_bf16_parts:
                    flat += matmul_from_bf16_parts(bf16_parts(flat_grads[:, start : start + ctx.rows]), block)
                else:
                    grad_x += grad_out[..., start : start + ctx.rows] @ block.float()
        return grad_x, None, None, None, None


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


def takes_bf16_parts(weight: torch.Tensor, bf16_parts_matmuls: bool) -> bool:
    """Whether FrozenLinearInFp32 multiplies bf16 parts of its input by `weight` (a bf16 weight, where the backend's
    bf16 matmuls write fp32), rather than upcast blocks of it."""
    return bf16_parts_matmuls and weight.dtype == torch.bfloat16


def fp32_products(module: nn.Module, why_no_bf16_parts: str | None) -> str:
    """How a head that computes_in_fp32 computes its fp32 products, for the report; `why_no_bf16_parts`: the
    backend's answer (None: its bf16 matmuls write fp32)."""
    if takes_bf16_parts(weight_of(module), why_no_bf16_parts is None):
        return "fp32 products from three bf16 matmuls writing fp32 (the input's exact bf16 parts)"
    reason = why_no_bf16_parts or f"its weight is {weight_of(module).dtype}"
    return f"fp32 matmuls over upcast blocks of the weight ({reason})"


def fp32_linear_forward(
    module: nn.Module, chunk_bytes: int, cast_input: bool, bf16_parts_matmuls: bool = False
) -> Callable[[Forward], Forward]:
    """lm_head in fp32 from its half-precision weight; `cast_input`: a half-precision input is computed in fp32 too
    ("layer" mode, whose stream between blocks is half precision), giving fp32 logits as in "fp32" mode.
    `bf16_parts_matmuls`: the backend's bf16 matmuls can write fp32 (a bf16 weight then multiplies the input's three
    bf16 parts instead of being upcast)."""

    def make(call_previous: Forward) -> Forward:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            weight = weight_of(module)
            if cast_input and x.dtype in HALF_DTYPES:
                x = x.float()
            if x.dtype == torch.float32 and weight.dtype != torch.float32 and not weight.requires_grad:
                rows = max(1, chunk_bytes // (4 * weight.shape[1]))
                from_parts = takes_bf16_parts(weight, bf16_parts_matmuls)
                return FrozenLinearInFp32.apply(x, weight, getattr(module, "bias", None), rows, from_parts)
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


def fp32_compute_forward(module: nn.Module) -> Callable[[Forward], Forward]:
    names = [name for name, p in module._parameters.items() if p is not None and p.is_floating_point()]

    def make(call_previous: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            with parameters_in_fp32(module, names):
                return call_previous(*args, **kwargs)

        return forward

    return make
