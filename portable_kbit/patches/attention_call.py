"""One call of prepare()'s attention function: which path it takes, the call itself, and a count of the paths per
model.

The paths, decided per call with the call's own tensors and the device's Backend:

- ``sdpa``: transformers' ``sdpa_attention_forward`` as it is;
- ``sdpa, k/v expanded``: an fp32 grouped-query call that the fused kernels refuse with ``enable_gqa`` runs with k/v
  repeated to the query heads, which the memory-efficient kernel takes;
- for a call of ``Backend.query_blocks_from`` query rows or more that only the math kernel would take (its
  [heads, L, L] scores: every training call on Apple MPS), ``Backend.long_attention`` says:
  ``memory-efficient kernel, asked for`` (transformers' call inside ``sdpa_kernel``) or ``query blocks``
  (patches/query_blocks.py). A call query blocks cannot take (dropout while training, a mask that takes gradients)
  keeps transformers' call, and is counted with the reason.

Where the model's switch asked for it (``activations="mixed"``), fp32 q/k/v are cast to the model's half-precision
dtype first, so the call takes the fused half-precision kernels (flash, cuDNN), and the output is cast back to fp32;
such paths are counted as "<path> in <dtype>".
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from typing import Any

import torch
from torch import nn

from .. import backends
from ..backends import Backend
from ..backends.base import MEMORY_EFFICIENT_KERNEL, QUERY_BLOCKS
from .query_blocks import query_block_attention

SDPA = "sdpa"
EXPANDED = "sdpa, k/v expanded"


class AttentionCalls:
    """Our attention on one model: the dtype fp32 calls compute in (None: fp32), and live counts since prepare() of
    the calls per path and of the long calls that kept transformers' call, by reason."""

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype
        self.paths: Counter[str] = Counter()
        self.kept: Counter[str] = Counter()

    def to_dict(self) -> dict[str, Any]:
        return {"paths": dict(self.paths), "kept_sdpa": dict(self.kept)}

    def line(self) -> str:
        paths = ", ".join(f"{path}: {n}" for path, n in sorted(self.paths.items())) or "none yet"
        kept = "; ".join(f"{reason}: {n}" for reason, n in sorted(self.kept.items()))
        return f"attention calls since prepare(): {paths}" + (f" (kept sdpa: {kept})" if kept else "")

    def __repr__(self) -> str:
        return f"AttentionCalls({self.to_dict()!r})"


#: the counts of each model whose attention prepare() switched, by its configs' ids (an attention module holds its
#: model's config; configs are not hashable), with a weak reference that tells a reused id; kept while the switch
#: stands
_COUNTS: dict[int, tuple[weakref.ref, AttentionCalls]] = {}


def count_calls_of(configs: list[Any], calls: AttentionCalls) -> None:
    for config in configs:
        _COUNTS[id(config)] = (weakref.ref(config), calls)


def forget_calls_of(configs: list[Any], calls: AttentionCalls) -> None:
    for config in configs:
        entry = _COUNTS.get(id(config))
        if entry is not None and entry[1] is calls:
            del _COUNTS[id(config)]


def _calls_of(config: Any) -> AttentionCalls | None:
    entry = _COUNTS.get(id(config)) if config is not None else None
    return entry[1] if entry is not None and entry[0]() is config else None


def _count(module: Any, path: str, kept: str | None = None, dtype: torch.dtype | None = None) -> None:
    calls = _calls_of(getattr(module, "config", None))
    if dtype is not None:
        path = f"{path} in {str(dtype).removeprefix('torch.')}"
    if calls is not None:
        calls.paths[path] += 1
        if kept is not None:
            calls.kept[kept] += 1


# ---- which path -----------------------------------------------------------------------------------------------------


def _backend_for(device: torch.device) -> Backend | None:
    try:
        return backends.for_device(device)
    except backends.BackendUnavailableError:  # a device we have no backend for: transformers' call as it is
        return None


def _causal(module: Any, is_causal: bool | None, query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """As transformers' sdpa function decides it."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(causal) and attention_mask is None and query.shape[2] > 1


def expands_kv(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool | None,
) -> bool:
    """Whether this call takes the expanded path: fp32 grouped-query attention over more than one query position,
    which the device's Backend says the fused kernels would refuse with ``enable_gqa``."""
    if query.dtype != torch.float32 or query.dim() != 4 or key.dim() != 4:
        return False
    q_heads, kv_heads, q_length = query.shape[1], key.shape[1], query.shape[2]
    if kv_heads >= q_heads or q_heads % kv_heads or q_length <= 1:  # not GQA, or decoding (transformers packs it)
        return False
    backend = _backend_for(query.device)
    if backend is None:
        return False
    causal = _causal(module, is_causal, query, attention_mask)
    return backend.fp32_attention_needs_expanded_kv(query, key, value, attention_mask, dropout, causal)


def _as_made(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, expanded: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Small stand-ins (sequences cut to 8) for the call transformers' sdpa will make, to ask the dispatcher about it
    without building it at full length: k/v repeated where it repeats them, ``enable_gqa`` where it passes that."""
    cut = slice(0, 8)
    q, k, v = query[:, :, cut], key[:, :, cut], value[:, :, cut]
    m = mask[..., cut, cut] if mask is not None and mask.dim() >= 2 else mask
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return q, k, v, m, False
    if not expanded and m is None and k.shape[-1] == v.shape[-1] <= 256:
        return q, k, v, m, True  # transformers' use_gqa_in_sdpa
    return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), m, False


def path_of(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool | None,
    position_bias: torch.Tensor | None = None,
) -> tuple[str, str | None]:
    """(the path of this call, why a long call kept transformers' call or None)."""
    backend = _backend_for(query.device)
    if backend is None or query.dim() != 4 or key.dim() != 4:
        return SDPA, None
    expanded = expands_kv(module, query, key, value, attention_mask, dropout, is_causal)
    plain = EXPANDED if expanded else SDPA
    if query.shape[2] < backend.query_blocks_from:
        return plain, None
    causal = _causal(module, is_causal, query, attention_mask)
    q, k, v, m, enable_gqa = _as_made(query, key, value, attention_mask, expanded)
    long = backend.long_attention(q, k, v, m, dropout, causal, enable_gqa)
    if long is None:
        return plain, None
    if long == MEMORY_EFFICIENT_KERNEL:
        return long, None
    if dropout > 0 and torch.is_grad_enabled():
        return plain, "dropout while training (query blocks do not drop out)"
    bias = position_bias if position_bias is not None else attention_mask
    if isinstance(bias, torch.Tensor) and bias.requires_grad:
        return plain, "a mask or position bias that takes gradients"
    return QUERY_BLOCKS, None


# ---- the call -------------------------------------------------------------------------------------------------------


class _WithoutKvGroups:
    """The attention module as transformers' sdpa function sees it once k/v are expanded: no ``num_key_value_groups``,
    so it neither repeats k/v again nor passes ``enable_gqa``; every other attribute is the module's."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        if name == "num_key_value_groups":
            raise AttributeError(name)
        return getattr(self._module, name)


def _query_blocks(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    position_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa function's contract (causal when it would be, k/v cut to the queries then, a position bias
    folded into the mask; [batch, L, heads, d] out), on query blocks."""
    causal = _causal(module, is_causal, query, attention_mask)
    if causal and key.shape[2] > query.shape[2]:
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        causal = False
    out = query_block_attention(query, key, value, attention_mask, scaling, causal)
    return out.transpose(1, 2).contiguous(), None


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """prepare()'s attention function: transformers' sdpa attention, on the path this call gets (module doc)."""
    calls = _calls_of(getattr(module, "config", None))
    half = calls.compute_dtype if calls is not None else None
    if half is None or query.dtype != torch.float32:
        return _attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    # "mixed": q/k/v (and a floating-point mask) in the model's dtype, the output back in fp32
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(half)
    q, k, v = query.to(half), key.to(half), value.to(half)
    output, weights = _attention(module, q, k, v, attention_mask, dropout, scaling, is_causal, kwargs, half)
    return output.to(query.dtype), weights


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict[str, Any],
    cast_to: torch.dtype | None = None,
) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_bias = kwargs.get("position_bias")
    path, kept = path_of(module, query, key, value, attention_mask, dropout, is_causal, position_bias)
    if path == QUERY_BLOCKS:
        if kwargs.get("softcap") is None and not kwargs.get("output_attentions"):
            _count(module, path, dtype=cast_to)
            return _query_blocks(module, query, key, value, attention_mask, scaling, is_causal, position_bias)
        path, kept = SDPA, "softcap or output_attentions (sdpa's own refusal or warning follows)"
    caller: Any = module
    if path == EXPANDED:
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        caller = _WithoutKvGroups(module)
    context: Any = contextlib.nullcontext()
    if path == MEMORY_EFFICIENT_KERNEL:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    _count(module, path, kept, cast_to)
    with context:
        return sdpa_attention_forward(
            caller, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
