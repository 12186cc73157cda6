"""Attention over blocks of queries, recomputed in backward: what runs where no fused kernel takes a training call
(Apple MPS), so that attention never holds the [heads, L, L] scores of the math kernel.

One autograd Function, in plain torch. The forward computes each block of query rows against the keys it can see (a
causal block stops at its last row), keeps only the output and each row's log-sum-exp, and frees the block's scores.
The backward recomputes a block's probabilities from them and accumulates the key and value gradients, block by
block (FlashAttention's algorithm, at the granularity of torch ops). Grouped-query attention runs on the key/value
heads as they are: a block's query heads are grouped by the key/value head they share, never expanded. Scores and
softmax are fp32; the matmuls run in the inputs' dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: query rows per block never below this (fewer rows would be all Python overhead)
MIN_ROWS = 16


def block_rows(query: torch.Tensor, key: torch.Tensor) -> int:
    """Rows per block: the largest power of two that keeps a block's fp32 temporaries (scores, probabilities and their
    gradients: about three [heads, rows, keys] tensors) within twice the bytes of the query. Measured on the CPU at
    8192 tokens (benchmarks/attention_blocks.py): 1.17x the fused kernel's memory, 1.3x its time; half the rows saved
    a fifth of the memory at twice the time (before blocks freed their temporaries early)."""
    heads, length, width = query.shape[1], query.shape[2], query.shape[3]
    per_row = 3 * heads * key.shape[2] * 4
    rows = max(MIN_ROWS, (2 * heads * length * width * query.element_size()) // max(1, per_row))
    return min(1 << (rows.bit_length() - 1), max(MIN_ROWS, length))


def _grouped(tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, heads, rows, d] -> [b, kv_heads, groups * rows, d]: query head i shares key/value head i // groups."""
    b, heads, rows, width = tensor.shape
    return tensor.reshape(b, kv_heads, (heads // kv_heads) * rows, width)


def _ungrouped(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    b, kv_heads, grouped_rows, width = tensor.shape
    return tensor.reshape(b, heads, grouped_rows // (heads // kv_heads), width)


def _block_mask(
    mask: torch.Tensor | None, causal: bool, start: int, stop: int, keys: int, device: torch.device
) -> torch.Tensor | None:
    """An additive fp32 mask [mb, mh, rows, keys] for query rows [start, stop) (None: nothing masked)."""
    additive = None
    if mask is not None:
        part = mask[..., start:stop, :keys]
        if part.dtype == torch.bool:
            additive = torch.zeros(part.shape, dtype=torch.float32, device=device).masked_fill_(~part, -math.inf)
        else:
            additive = part.float()
    if causal:
        rows = torch.arange(start, stop, device=device)[:, None]
        above = torch.arange(keys, device=device)[None, :] > rows
        causal_part = torch.zeros(above.shape, dtype=torch.float32, device=device).masked_fill_(above, -math.inf)
        additive = causal_part if additive is None else additive + causal_part
    return additive


def _scores(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float, heads: int
) -> torch.Tensor:
    """fp32 scores of a block, grouped: [b, kv_heads, groups * rows, keys], the mask added."""
    kv_heads = key.shape[1]
    scores = torch.matmul(_grouped(query, kv_heads), key.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        mask = mask if mask.dim() == 4 else mask.view(1, 1, *mask.shape[-2:])
        b, _, grouped_rows, keys = scores.shape
        groups, rows = heads // kv_heads, grouped_rows // (heads // kv_heads)
        if mask.shape[1] == 1:
            shaped = mask.reshape(mask.shape[0], 1, 1, rows, keys)
        else:  # one mask per query head
            shaped = mask.reshape(mask.shape[0], kv_heads, groups, rows, keys)
        scores = scores.view(b, kv_heads, groups, rows, keys).add_(shaped).view(b, kv_heads, grouped_rows, keys)
    return scores


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(scores - lse) in the scores' own memory (a block holds one fp32 [rows, keys] tensor, not three), with rows
    that see no key at all (lse -inf) all zeros rather than NaN."""
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return scores.sub_(finite.unsqueeze(-1)).exp_()


#: the fp32 temporaries of a block's backward are made a quarter of its rows at a time
BACKWARD_ROW_SPLITS = 4


def _times_centred(probabilities: torch.Tensor, grad_probabilities: torch.Tensor, row_dot: torch.Tensor) -> None:
    """probabilities *= (grad_probabilities - row_dot), in fp32, in place: a part of the rows at a time, so that the
    fp32 copy of the (half-precision) probability gradients is never whole (a block peaks at 1.75 [rows, keys] fp32
    tensors instead of 2.5)."""
    rows = probabilities.shape[-2]
    step = max(1, -(-rows // BACKWARD_ROW_SPLITS))
    for start in range(0, rows, step):
        part = slice(start, start + step)
        probabilities[..., part, :].mul_(grad_probabilities[..., part, :].float().sub_(row_dot[..., part, :]))


class QueryBlockAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v over blocks of `rows` query rows; saves the output and the row log-sum-exp."""

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        causal: bool,
        rows: int,
    ) -> torch.Tensor:
        b, heads, length, _ = query.shape
        kv_heads = key.shape[1]
        out = query.new_empty(b, heads, length, value.shape[-1])
        lse = torch.empty(b, kv_heads, (heads // kv_heads) * length, dtype=torch.float32, device=query.device)
        lse = lse.view(b, kv_heads, heads // kv_heads, length)
        for start in range(0, length, rows):
            stop = min(length, start + rows)
            keys = min(stop, key.shape[2]) if causal else key.shape[2]
            block_mask = _block_mask(mask, causal, start, stop, keys, query.device)
            scores = _scores(query[:, :, start:stop], key[:, :, :keys], block_mask, scale, heads)
            block_lse = torch.logsumexp(scores, dim=-1)
            probabilities = _probabilities(scores, block_lse).to(value.dtype)
            del scores
            out[:, :, start:stop] = _ungrouped(torch.matmul(probabilities, value[:, :, :keys]), heads)
            del probabilities  # before the next block makes its own
            lse[:, :, :, start:stop] = block_lse.view(b, kv_heads, heads // kv_heads, stop - start)
        ctx.save_for_backward(query, key, value, out, lse, mask)
        ctx.scale, ctx.causal, ctx.rows = scale, causal, rows
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        query, key, value, out, lse, mask = ctx.saved_tensors
        scale, causal, rows = ctx.scale, ctx.causal, ctx.rows
        b, heads, length, _ = query.shape
        kv_heads = key.shape[1]
        grad_query = torch.empty_like(query)
        grad_key = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_out = grad_out.contiguous()
        for start in range(0, length, rows):
            stop = min(length, start + rows)
            keys = min(stop, key.shape[2]) if causal else key.shape[2]
            block_mask = _block_mask(mask, causal, start, stop, keys, query.device)
            query_block = query[:, :, start:stop]
            scores = _scores(query_block, key[:, :, :keys], block_mask, scale, heads)
            block_lse = lse[:, :, :, start:stop].reshape(b, kv_heads, -1)
            probabilities = _probabilities(scores, block_lse)
            del scores
            grad_block = _grouped(grad_out[:, :, start:stop], kv_heads)
            grad_value[:, :, :keys] += torch.matmul(probabilities.to(grad_block.dtype).transpose(-1, -2), grad_block)
            grad_probabilities = torch.matmul(grad_block, value[:, :, :keys].transpose(-1, -2))
            row_dot = (grad_block.float() * _grouped(out[:, :, start:stop], kv_heads).float()).sum(-1, keepdim=True)
            _times_centred(probabilities, grad_probabilities, row_dot)
            del grad_probabilities
            grad_scores = probabilities.mul_(scale).to(query.dtype)
            del probabilities
            grad_query[:, :, start:stop] = _ungrouped(torch.matmul(grad_scores, key[:, :, :keys]), heads)
            grad_key[:, :, :keys] += torch.matmul(grad_scores.transpose(-1, -2), _grouped(query_block, kv_heads))
            del grad_scores  # before the next block makes its own
        return grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), None, None, None, None


def query_block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    rows: int | None = None,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` (no dropout) over blocks of query rows: [b, heads, L, d] in and out; key and
    value may have fewer heads (grouped-query attention, without expanding them); a boolean (True: attend) or additive
    mask broadcastable to [b, 1 or heads, L, keys]; ``is_causal`` aligned at the top left, as torch's."""
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key/value heads")
    if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[0] not in (1, query.shape[0]):
        raise ValueError(f"a mask of shape {tuple(attn_mask.shape)} for a batch of {query.shape[0]}")
    if attn_mask is not None:
        attn_mask = attn_mask.expand(
            attn_mask.shape[0] if attn_mask.dim() == 4 else 1,
            attn_mask.shape[1] if attn_mask.dim() == 4 else 1,
            query.shape[2],
            key.shape[2],
        )
    scale = scale if scale is not None else 1 / math.sqrt(query.shape[-1])
    rows = rows or block_rows(query, key)
    return QueryBlockAttention.apply(query, key, value, attn_mask, scale, is_causal, rows)
