"""A position-wise MLP run on blocks of tokens, each block checkpointed (recomputed in backward): the
``[tokens, intermediate]`` temporaries exist for one block at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...model.trace import MlpCandidate, is_tracing
from ..protocol import Forward
from .counts import MLPS, BlockedCalls


def checkpointed(function: Callable, *args: Any) -> Any:
    """`function(*args)`, its activations recomputed in backward (non-reentrant: nests in transformers' own)."""
    if not torch.is_grad_enabled():
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False)


def collector_var() -> Any:
    """transformers 5's output collector (a context variable holding lists of recorded outputs), or None."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    return getattr(output_capturing, "_active_collector", None)


class _RecordedOutputs:
    """transformers 5's collected outputs (router logits) during one blocked MLP call, merged back to one entry per
    call: what the unblocked call would have recorded."""

    def __init__(self) -> None:
        var = collector_var()
        collected = var.get() if var is not None else None
        self.collected = collected if isinstance(collected, dict) else None
        self.lengths = (
            {k: len(v) for k, v in self.collected.items() if isinstance(v, list)} if self.collected is not None else {}
        )

    def merge(self, blocks: int, rows: list[int]) -> None:
        if self.collected is None:
            return
        for key, start in self.lengths.items():
            entries = self.collected[key]
            grown = entries[start:]
            if not grown:
                continue
            if len(grown) % blocks:
                raise RuntimeError(
                    f"portable_kbit token blocks: {len(grown)} recorded {key!r} entries from {blocks} blocks; "
                    "cannot merge them. Pass token_blocks=None to prepare()."
                )
            per = len(grown) // blocks
            entries[start:] = [_concat_rows([grown[b * per + j] for b in range(blocks)], rows) for j in range(per)]


def _concat_rows(parts: list[Any], rows: list[int]) -> Any:
    if not all(isinstance(p, torch.Tensor) for p in parts):
        return parts[0] if all(p is None for p in parts) else parts
    for dim in range(parts[0].dim()):
        if all(p.shape[dim] == n for p, n in zip(parts, rows, strict=True)):
            return torch.cat(parts, dim=dim)
    raise RuntimeError(
        f"portable_kbit token blocks: cannot merge recorded outputs of shapes {[tuple(p.shape) for p in parts]}. "
        "Pass token_blocks=None to prepare()."
    )


def blocked_forward(
    module: nn.Module, size: int, candidate: MlpCandidate, counts: BlockedCalls
) -> Callable[[Forward], Forward]:
    """The MLP's forward over blocks of `size` tokens, around `inner` (what it replaces); each call counted, blocked
    or whole with the reason."""

    def make(inner: Forward) -> Forward:
        def run(block: torch.Tensor) -> Any:
            return inner(block.clone() if candidate.mutates_input else block)

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if is_tracing():
                return inner(x, *args, **kwargs)
            reason = _why_whole(module, size, x, args, kwargs)
            if reason is not None:
                counts.ran_whole(MLPS, reason)
                return inner(x, *args, **kwargs)
            counts.ran_blocked(MLPS)
            width = x.shape[-1]
            flat = x.reshape(-1, width)
            recorded = _RecordedOutputs() if candidate.records else None
            outputs, rows = [], []
            for start in range(0, flat.shape[0], size):
                block = flat[start : start + size].unsqueeze(0)
                outputs.append(checkpointed(run, block))
                rows.append(block.shape[1])
            if recorded is not None:
                recorded.merge(len(outputs), rows)
            if candidate.kind != "tuple":
                return torch.cat(outputs, dim=1).view(x.shape)
            first = torch.cat([o[0] for o in outputs], dim=1).view(x.shape)
            rest = [torch.cat([o[i] for o in outputs], dim=0) for i in range(1, len(outputs[0]))]
            return (first, *rest)

        return forward

    return make


def _why_whole(module: nn.Module, size: int, x: Any, args: tuple, kwargs: dict) -> str | None:
    """Why this call runs whole (None: it runs in blocks)."""
    if args or kwargs:
        return "called with more than the hidden states"
    if not module.training:
        return "eval mode"
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return "its input is not a tensor of tokens"
    if x.numel() // max(1, x.shape[-1]) <= size:
        return "one block or fewer tokens"
    return None
