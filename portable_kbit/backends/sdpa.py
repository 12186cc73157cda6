"""Which SDPA kernel torch's dispatcher picks for an attention call, asked with the call's own tensors (also when
they are fake tensors of a memory forecast)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def sdpa_kernel_choice(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    enable_gqa: bool,
) -> str | None:
    """The kernel torch's SDPA dispatcher picks for this call ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH" ...),
    asked through ``torch._fused_sdp_choice`` (private: the dispatcher's own answer, with ``enable_gqa`` from torch
    2.5); None where this torch or device cannot say."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return None
    try:
        from torch.nn.attention import SDPBackend

        with real_tensors_for_fake(query, key, value, attn_mask) as (query, key, value, attn_mask):
            index = choose(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa=enable_gqa)
        return SDPBackend(index).name
    except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError):
        return None


@contextlib.contextmanager
def real_tensors_for_fake(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> Iterator[tuple]:
    """Under FakeTensorMode (the memory forecast's fake step) the dispatcher answers MATH for every call: ask it with
    small real tensors of the same dtype, device, heads, head size and requires_grad instead (sequences cut to 8)."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    if not any(isinstance(t, FakeTensor) for t in (query, key, value, mask)):
        yield query, key, value, mask
        return

    def stand_in(tensor: Any, sequence_dims: tuple[int, ...]) -> Any:
        if not isinstance(tensor, FakeTensor):
            return tensor
        cut = {d % tensor.dim() for d in sequence_dims}
        shape = [min(size, 8) if dim in cut else size for dim, size in enumerate(tensor.shape)]
        return torch.zeros(shape, dtype=tensor.dtype, device=tensor.fake_device, requires_grad=tensor.requires_grad)

    with unset_fake_temporarily():
        yield (
            stand_in(query, (-2,)),
            stand_in(key, (-2,)),
            stand_in(value, (-2,)),
            stand_in(mask, (-2, -1)) if mask is not None and mask.dim() >= 2 else mask,
        )


def probe_efficient_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's memory-efficient SDPA kernel, asked for, runs forward and backward of a small causal call on
    `device` in `dtype` (False where this torch lacks it there or refuses the call)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        query = torch.randn(1, 2, 8, 16, dtype=dtype, device=device, requires_grad=True)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(query, query, query, is_causal=True)
        out.float().sum().backward()
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError, ImportError):
        return False
    return query.grad is not None and bool(torch.isfinite(query.grad).all())
