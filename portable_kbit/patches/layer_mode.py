"""Layer mode (``activations="layer"``): each checkpointed layer computes in fp32 from its half-precision inputs,
cast inside its gradient checkpoint, and hands the model's dtype on; the stream between layers stays half precision."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..constants import HALF_DTYPES
from .arguments import first_tensor, replace_first
from .protocol import Forward


def _half_to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in HALF_DTYPES else value
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_half_to_fp32(v) for v in value)
    return value


def _in_fp32(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    return tuple(_half_to_fp32(a) for a in args), {k: _half_to_fp32(v) for k, v in kwargs.items()}


def _checkpoints_its_forward(layer: nn.Module) -> bool:
    """Whether this call of a transformers layer will checkpoint its class forward rather than its __call__.

    transformers' GradientCheckpointingLayer checkpointed ``__call__`` (hooks and an instance forward inside the
    checkpoint) until it moved to wrapping the class's ``forward`` (module hooks and instance forwards stay outside, so
    that FSDP2's do not run twice); the wrapper checkpoints when these flags hold."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    if not isinstance(layer, GradientCheckpointingLayer) or "__call__" in GradientCheckpointingLayer.__dict__:
        return False
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training and torch.is_grad_enabled()


def _checkpoint_in_fp32(checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A checkpoint function whose checkpointed call gets its half-precision inputs in fp32: the cast runs inside
    the checkpoint (in the forward and again in the recompute), so the checkpoint keeps the half-precision input."""

    def checkpoint_in_fp32(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def run(*inputs: Any) -> Any:
            if isinstance(function, functools.partial):
                bound, keywords = _in_fp32(function.args, function.keywords)
                return function.func(*bound, *_in_fp32(inputs, {})[0], **keywords)
            return function(*_in_fp32(inputs, {})[0])

        return checkpoint(run, *args, **kwargs)

    return checkpoint_in_fp32


def layer_in_fp32(layer: nn.Module) -> Callable[[Forward], Forward]:
    """ "layer" mode: a layer computes as in "fp32" mode. Its half-precision inputs (the hidden states, and what the
    model computed once for every layer in its dtype: an additive attention mask, ALiBi biases, rotary cos/sin) are
    cast to fp32 where its computation starts, inside its gradient checkpoint, so that the checkpoint keeps the
    half-precision input (the point of this mode) and no op in the layer meets two dtypes (a post-norm layer feeds
    its input straight to attention; some layers mix their input with fp32 results in a matmul)."""

    def make(call_previous: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            checkpoint = layer.__dict__.get("_gradient_checkpointing_func")
            if checkpoint is not None and _checkpoints_its_forward(layer):
                layer.__dict__["_gradient_checkpointing_func"] = _checkpoint_in_fp32(checkpoint)
                try:
                    return call_previous(*args, **kwargs)
                finally:
                    layer.__dict__["_gradient_checkpointing_func"] = checkpoint
            args, kwargs = _in_fp32(args, kwargs)
            return call_previous(*args, **kwargs)

        return forward

    return make


def layer_output_to(dtype: torch.dtype) -> Callable[[nn.Module, tuple, Any], Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        y = first_tensor(output)
        if y is None or y.dtype != torch.float32:
            return None
        return replace_first(output, y.to(dtype))

    return hook
