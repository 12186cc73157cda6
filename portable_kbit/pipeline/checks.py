"""prepare()'s refusals, all before the model is touched: its options, the model, gradient checkpointing support,
and the device to prepare on."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .. import backends
from ..backends import Target
from ..errors import NoQuantizedWeightWarning
from ..model.hf import hf_model, input_embeddings
from ..model.index import ModelIndex
from ..patches.token_blocks.plan import check_option as check_token_blocks
from . import plan

#: prepare()'s ``activations`` modes
ACTIVATIONS = ("fp32", "mixed", "layer", "native")


def peft_positional_compat(device: Any, use_gradient_checkpointing: bool) -> tuple[Any, bool]:
    # peft's signature is (model, use_gradient_checkpointing, ...): prepare(model, True) must keep working.
    if isinstance(device, bool):
        return "auto", device
    return device, use_gradient_checkpointing


def check_options(
    *,
    upcast: str = "adjacent",
    activations: str = "fp32",
    frozen_norms: str = "compute",
    chunk_bytes: int | None = None,
    gradient_checkpointing_kwargs: Any = None,
    token_blocks: Any = None,
    offload_checkpoints: Any = "auto",
    tf32: Any = False,
) -> None:
    """prepare()'s options, checked before anything is touched (keyword names as prepare() takes them)."""
    checkpointing_kwargs = gradient_checkpointing_kwargs
    if upcast not in plan.POLICIES:
        raise ValueError(f"upcast={upcast!r} is not a policy; use one of {', '.join(map(repr, plan.POLICIES))}")
    if activations not in ACTIVATIONS:
        raise ValueError(
            f"activations={activations!r} is not known; use 'fp32' (peft's numerics), 'mixed' (fp32 stream and "
            "adapters, attention and frozen MLPs in the model's dtype), 'layer' (fp32 inside each checkpointed layer, "
            "the model's dtype between layers) or 'native'"
        )
    if frozen_norms not in plan.FROZEN_NORMS:
        raise ValueError(
            f"frozen_norms={frozen_norms!r} is not known; use 'compute' (fp32 at call time, parameters untouched) "
            "or 'upcast' (parameters cast to fp32)"
        )
    if chunk_bytes is not None and (
        isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
    ):
        raise ValueError(
            f"chunk_bytes={chunk_bytes!r} must be a positive int (bytes), or None for the backend's default"
        )
    check_token_blocks(token_blocks)
    if not (offload_checkpoints is True or offload_checkpoints is False or offload_checkpoints == "auto"):
        raise ValueError(
            f"offload_checkpoints={offload_checkpoints!r} is not valid: use 'auto' (where it frees memory and was "
            "measured to pay), True (on, or refused where it cannot help) or False"
        )
    if not isinstance(tf32, bool):
        raise ValueError(f"tf32={tf32!r} is not valid: use True (TF32 for fp32 matmuls on CUDA) or False")
    if checkpointing_kwargs is not None and not isinstance(checkpointing_kwargs, dict):
        raise TypeError(
            f"gradient_checkpointing_kwargs must be a dict or None, not {type(checkpointing_kwargs).__name__}"
        )


def check_model(model: Any) -> ModelIndex:
    """The model's index, once it is known to be a model prepare() can work on."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"prepare() takes a torch.nn.Module (a transformers model or a PeftModel), not {type(model).__name__}"
        )
    index = ModelIndex(model)
    if not index.parameters:
        raise ValueError("the model has no parameters: nothing to prepare")
    with torch._C.DisableTorchFunctionSubclass():  # quantized subclasses dispatch every attribute read otherwise
        meta = [name for name, p in index.parameters.items() if p.device.type == "meta"]
    device_map = getattr(model, "hf_device_map", None) or {}
    offloaded = (
        sorted({str(d) for d in device_map.values()} & {"disk", "meta"}) if isinstance(device_map, dict) else []
    )
    if meta and offloaded:  # accelerate keeps offloaded weights on the meta device and loads them per forward
        raise ValueError(
            f"{len(meta)} parameters are offloaded by the device_map (to {', '.join(offloaded)}; e.g. {meta[0]}): "
            "prepare() needs every weight loaded on one device. Load the model with device_map={'': 0} "
            "(or 'mps' / 'cpu') and no offload."
        )
    if meta:
        raise ValueError(
            f"{len(meta)} parameters are on the meta device (e.g. {meta[0]}): the weights were never loaded. "
            "Load the model with from_pretrained(...) onto a real device before prepare()."
        )
    return index


#: what the host keeps free while checkpointed layer inputs are offloaded to it (each offload checks it too)
OFFLOAD_HOST_MARGIN = 2 << 30


def decide_offload(option: bool | str, target: Target, host_available: int, checkpointing: bool) -> tuple[bool, str]:
    """Whether checkpointed layer inputs go to host memory, and why (or why not). An explicit True that cannot help
    (unified memory, the CPU, no checkpointing, a host short of memory) is refused here, before any change."""
    if option is False:
        return False, "offload_checkpoints=False"
    why_not = target.backend.why_no_offload(target.device)
    if why_not is None and not checkpointing:
        why_not = "gradient checkpointing is off: there are no checkpointed layer inputs to keep"
    if why_not is None and host_available < OFFLOAD_HOST_MARGIN:
        why_not = (
            f"the host has {host_available >> 20} MiB available, less than the {OFFLOAD_HOST_MARGIN >> 20} MiB it "
            "keeps free"
        )
    if why_not is not None and option is True:
        raise ValueError(
            f"offload_checkpoints=True: {why_not}. Pass offload_checkpoints='auto' (left off where it cannot help) "
            "or False."
        )
    if why_not is not None:
        return False, why_not
    if option == "auto":
        return False, (
            "'auto' leaves it off until it is measured to pay on this kind of device; offload_checkpoints=True turns "
            "it on"
        )
    return True, f"on: to {'pinned ' if target.backend.pins_host_memory else ''}host memory"


def decide_tf32(option: bool, target: Target, activations: str) -> tuple[bool, str]:
    """Whether fp32 matmuls go to TF32, and why (or why not). True where the device has no TF32 is refused here,
    before any change."""
    if not option:
        return False, "tf32=False"
    why_not = target.backend.why_no_tf32(target.device)
    if why_not is not None:
        raise ValueError(f"tf32=True: {why_not}. Pass tf32=False (the default) on this device.")
    if activations == "native":
        return True, "on, though activations='native' leaves few fp32 matmuls for it to speed up"
    return True, "on: fp32 matmuls use TF32 tensor cores (a numerics change, process-wide)"


def warn_if_not_quantized(index: ModelIndex) -> None:
    """A model without a quantized weight is prepared all the same, with a warning that says so (said once per call,
    before any change)."""
    if index.quantized:
        return
    warnings.warn(
        "prepare() found no quantized weight in this model: it is prepared all the same (frozen base weights, fp32 "
        "norms next to the adapters, gradient checkpointing), but portable_kbit is made for quantized models. For "
        "QLoRA, load the model with a quantization_config (bitsandbytes 4-bit, optimum-quanto).",
        NoQuantizedWeightWarning,
        stacklevel=3,
    )


def check_checkpointing_support(model: nn.Module, enabled: bool, kwargs: dict | None) -> None:
    """Gradient checkpointing is asked for (the default, as with peft): the model must support it, and with the
    reentrant variant (transformers' default) its input embeddings must be a module the forward calls, since the
    input gradients it needs come from a hook on get_input_embeddings(). Said before any change."""
    if not enabled:
        return
    base = hf_model(model)
    if getattr(base, "supports_gradient_checkpointing", True) is False:
        raise ValueError(
            f"{type(base).__name__} does not support gradient checkpointing in transformers, which prepare() enables "
            "by default (as peft's prepare_model_for_kbit_training does). Pass use_gradient_checkpointing=False: "
            "training then works, and keeps every layer's activations for the backward pass (more memory)."
        )
    embeddings = input_embeddings(base)
    if (kwargs or {}).get("use_reentrant", True) and not _called_module(embeddings):
        found = "none" if embeddings is None else f"a {type(embeddings).__name__}, never called itself"
        raise ValueError(
            f"{type(base).__name__}'s input embeddings ({found}) cannot carry the hook that makes the layer inputs "
            "require gradients, which reentrant gradient checkpointing (transformers' default) needs: every adapter "
            "inside a checkpointed layer would get no gradient. Pass gradient_checkpointing_kwargs="
            "{'use_reentrant': False}, or use_gradient_checkpointing=False."
        )


def _called_module(module: nn.Module | None) -> bool:
    """A module whose forward runs (forward hooks fire): not a container such as the ModuleList of per-codebook
    embeddings that musicgen's get_input_embeddings() returns."""
    return module is not None and not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList))


def resolve_target(index: ModelIndex, device: Any) -> tuple[Target, torch.device | None]:
    """The backend and device to prepare on, and the device to move a CPU model to (None: no move)."""
    devices = index.devices
    kinds = sorted({d.type for d in devices})
    if len(kinds) > 1:
        raise ValueError(
            f"the model is split across {', '.join(map(str, devices))} (a device_map with offload); prepare() needs "
            "every weight on one kind of device. Load it with device_map={'': 0} (or 'mps' / 'cpu')."
        )
    model_device = devices[0]
    target = backends.resolve(device, model_device)
    if model_device.type == target.device.type:
        # "auto" (like "cuda" without an index) takes a device_map split over several GPUs of one kind: each cast
        # happens where its parameter lives. Only an explicit index must hold the whole model.
        auto = isinstance(device, str) and device.strip().lower() == "auto"
        wanted = None if auto else target.device.index
        if wanted is not None and any(d.index not in (None, wanted) for d in devices):
            raise ValueError(
                f"the model is on {', '.join(map(str, devices))} but device={device!r}; pass device='auto' "
                f"or move the model to {target.device} first"
            )
        return Target(target.backend, model_device), None
    if model_device.type == "cpu":
        if any(k.startswith("bitsandbytes") for k in index.quantized.values()):
            raise ValueError(
                f"this bitsandbytes model is on the CPU but device={device!r}: bitsandbytes quantizes while loading, "
                "so load it there: from_pretrained(..., quantization_config=..., "
                f"device_map={{'': '{target.device}'}})"
            )
        return target, target.device
    raise ValueError(
        f"the model is on {model_device} but device={device!r}; pass device='auto' to prepare it where it is, "
        f"or move it yourself"
    )


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
