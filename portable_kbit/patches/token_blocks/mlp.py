"""A position-wise MLP run on blocks of tokens, each block recomputed in backward: the ``[tokens, intermediate]``
temporaries exist for one block at a time.

Two ways, by what the MLP is:

- a plain tensor-to-tensor MLP without dropout (Llama's, Mistral's, most): one autograd Function (``BlockedMlp``),
  as DeepSpeed's TiledMLP: the forward runs the blocks without a graph, the backward recomputes each block with one
  and returns the gradients of the input and of the MLP's trainable parameters (adapters). Its input is saved by a
  separate node first (``SavedInput``), so that a non-reentrant layer checkpoint's recompute, which stops once it
  has every tensor the layer saved, stops there and never runs the MLP again: the MLP computes once forward and once
  in backward, as it would unblocked;
- anything else (tuple outputs with router logits, recorded outputs, an input changed in place, dropout): each block
  in a nested non-reentrant checkpoint.
"""

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


class SavedInput(torch.autograd.Function):
    """The identity, saving its input for ``BlockedMlp``'s backward (packed before the MLP runs: see module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class BlockedMlp(torch.autograd.Function):
    """``run`` over blocks of ``size`` rows of a [rows, width] input: no graph in forward; each block recomputed with
    one in backward, its input gradient written into place and the parameters' gradients summed over the blocks."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, saved: Any, run: Callable, size: int, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.saved, ctx.run, ctx.size, ctx.params = saved, run, size, params
        ctx.autocast = _autocast_dtype(x.device.type)
        # detached: no views that claim to need gradients without a graph (hooks on the inner modules see them)
        rows = x.detach()
        return torch.cat([run(rows[start : start + size]) for start in range(0, rows.shape[0], size)])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved.saved_tensors
        params = list(ctx.params)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        for start in range(0, x.shape[0], ctx.size):
            block = x[start : start + ctx.size].detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), _autocast(x.device.type, ctx.autocast):
                out = ctx.run(block)
            inputs = ([block] if grad_x is not None else []) + params
            grads = torch.autograd.grad(out, inputs, grad_output[start : start + ctx.size], allow_unused=True)
            if grad_x is not None:
                grad_x[start : start + ctx.size] = grads[0]
                grads = grads[1:]  # the parameters' gradients follow
            for i, g in enumerate(grads):
                total = grad_params[i]
                grad_params[i] = g if total is None else (total if g is None else total + g)
        return (grad_x, None, None, None, *grad_params)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The forward's autocast dtype on this device type (None: autocast off), for the recompute in backward."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast(device_type: str, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def _rows_forward(inner: Forward) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP's original forward on [rows, width] (as a [1, rows, width] sequence), its output as rows."""

    def run(rows: torch.Tensor) -> torch.Tensor:
        out = inner(rows.unsqueeze(0))
        return out.reshape(rows.shape[0], out.shape[-1])

    return run


def as_one_function(module: nn.Module, candidate: MlpCandidate) -> bool:
    """Whether the MLP runs as one BlockedMlp Function: one tensor out, nothing recorded, its input left as it is, and
    no dropout that the recompute would draw again differently."""
    dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())
    return candidate.kind == "tensor" and not candidate.records and not candidate.mutates_input and not dropout


def blocked_forward(
    module: nn.Module,
    size: int,
    candidate: MlpCandidate,
    counts: BlockedCalls,
    whole_up_to: int = 0,
    part: str = MLPS,
) -> Callable[[Forward], Forward]:
    """The MLP's (or another position-wise module's) forward over blocks of `size` tokens, around `inner` (what it
    replaces); a call of up to `whole_up_to` tokens runs whole. Each call counted under `part`, blocked or whole with
    the reason."""

    one_function = as_one_function(module, candidate)

    def make(inner: Forward) -> Forward:
        def run(block: torch.Tensor) -> Any:
            return inner(block.clone() if candidate.mutates_input else block)

        def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
            if is_tracing():
                return inner(x, *args, **kwargs)
            reason = _why_whole(module, size, whole_up_to, x, args, kwargs)
            if reason is not None:
                counts.ran_whole(part, reason)
                return inner(x, *args, **kwargs)
            counts.ran_blocked(part)
            width = x.shape[-1]
            flat = x.reshape(-1, width)
            if one_function and torch.is_grad_enabled():
                params = [p for p in module.parameters() if p.requires_grad]
                saved = SavedInput.apply(flat)
                out = BlockedMlp.apply(saved, saved.grad_fn, _rows_forward(inner), size, *params)
                return out.view(*x.shape[:-1], out.shape[-1])
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


def _why_whole(module: nn.Module, size: int, whole_up_to: int, x: Any, args: tuple, kwargs: dict) -> str | None:
    """Why this call runs whole (None: it runs in blocks)."""
    if args or kwargs:
        return "called with more than the hidden states"
    if not module.training:
        return "eval mode"
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return "its input is not a tensor of tokens"
    tokens = x.numel() // max(1, x.shape[-1])
    if tokens <= size:
        return "one block or fewer tokens"
    if tokens <= whole_up_to:
        return "no more tokens than the hidden width (the backend runs those whole: faster)"
    return None
