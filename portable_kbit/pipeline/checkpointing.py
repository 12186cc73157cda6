"""Gradient checkpointing as prepare() sets it up: transformers' own with peft's input gradients, and where the
checkpointed layer inputs live (on the device, or offloaded to host memory)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backends import Target
from ..model.hf import call, enable_checkpointing, hf_model, input_embeddings
from ..model.layers import checkpointed_layers
from ..patches.offload import CheckpointOffload
from ..patches.protocol import Hook, InstanceAttribute
from .transaction import Transaction


def enable_gradient_checkpointing(
    model: nn.Module, enabled: bool, kwargs: dict | None, previous_kwargs: dict | None
) -> dict | None:
    """As peft: input gradients unless use_reentrant=False, then transformers' own checkpointing (undone by the
    transaction's snapshot on failure). Returns the kwargs used (None: not enabled). A repeat with the kwargs of the
    last call (`previous_kwargs`) changes nothing (no duplicate hooks)."""
    if not enabled:
        return None
    # torch's default (reentrant), said explicitly: torch warns at every checkpointed call without it that a later
    # release will raise (peft's function passes {} and gets the warning)
    kwargs = {"use_reentrant": True, **(kwargs or {})}
    base = hf_model(model)
    if previous_kwargs == kwargs and _input_grads_enabled(base):
        return kwargs
    enable_checkpointing(base, kwargs)
    needs_input_grads = kwargs.get("use_reentrant", True)
    if needs_input_grads and not _input_grads_enabled(base):
        call(base, "enable_input_require_grads")
    return kwargs


def keep_inputs_off_the_leaves(model: nn.Module, checkpointing: dict | None, transaction: Transaction) -> None:
    """With reentrant checkpointing, transformers' input-gradient hook makes the embedding output a leaf that requires
    grad, and a model that adds to it in place (BLT's hash embeddings: `embeddings += ...`) then fails ("a leaf
    Variable that requires grad is being used in an in-place operation"), with peft's function too. A hook after it
    hands on a copy instead: no longer a leaf, the same values and gradients."""
    if checkpointing is None or not checkpointing.get("use_reentrant", True):
        return
    embeddings = input_embeddings(hf_model(model))
    if embeddings is not None:
        transaction.patches.apply(Hook(embeddings, _copy_of_leaf_output, pre=False))


def offload_checkpoint_inputs(
    model: nn.Module, enabled: bool, target: Target, transaction: Transaction
) -> CheckpointOffload | None:
    """Each checkpointed layer's checkpoint function, wrapped so that the inputs it saves go to host memory
    (patches/offload.py); returns the live counts of what went there."""
    if not enabled:
        return None
    backend, device = target.backend, target.device
    offload = CheckpointOffload(device, backend.offload_stream(device), backend.pins_host_memory)
    for layer in checkpointed_layers(model):
        checkpoint = layer.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None:
            transaction.patches.apply(
                InstanceAttribute(layer, "_gradient_checkpointing_func", offload.wrap(checkpoint))
            )
    return offload


def _copy_of_leaf_output(module: nn.Module, args: tuple, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.is_leaf and output.requires_grad:
        return output.clone()
    return None


def _input_grads_enabled(hf_model: nn.Module) -> bool:
    return bool(getattr(hf_model, "_require_grads_hooks", None) or getattr(hf_model, "_require_grads_hook", None))
