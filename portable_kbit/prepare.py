"""prepare(): make a quantized model ready for LoRA/QLoRA training without fp32 copies of frozen weights.

Reads top to bottom as the pipeline in DESIGN.md; each step is a function below (the per-device ones in accounting.py:
a model split over several GPUs is measured, budgeted, cast, released and reported per device). Nothing
device-specific here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, cast

import torch
from torch import nn

from . import backends, memory, plan
from .accounting import (
    DeviceShare,
    check_fits,
    chunks_of,
    device_targets,
    finish_on_devices,
    measure_after,
    measure_before,
    share_casts,
    smallest_chunk,
)
from .backends import Target
from .cast import CastJournal
from .flow import ForwardOverride, checkpoint_blocks, is_strict_consumer
from .flow import install as install_flow_hooks
from .index import ModelIndex
from .models import call, enable_checkpointing, hf_model, input_embeddings, is_peft_model
from .report import DeviceMemory, PrepReport
from .transaction import Transaction

ACTIVATIONS = ("fp32", "layer", "native")
STATE_ATTRIBUTE = "_portable_kbit_state"


@dataclasses.dataclass
class PrepState:
    """Kept on the model between calls: the last report and the hooks to replace on the next call."""

    report: PrepReport
    hook_handles: list
    checkpointing_kwargs: dict | None


def prepare(
    model: nn.Module,
    device: str | torch.device | bool = "auto",
    *,
    target_modules: Any = None,
    upcast: str = "adjacent",
    activations: str = "fp32",
    frozen_norms: str = "compute",
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    chunk_bytes: int | None = None,
) -> nn.Module:
    """Prepare a quantized transformers model (or a PeftModel) for LoRA/QLoRA training; returns the same model.

    A drop-in for ``peft.prepare_model_for_kbit_training``: it freezes the base weights and sets up gradient
    checkpointing and input gradients the same way, but it upcasts only what training needs, in bounded chunks, and
    records what that cost (``portable_kbit.report(model)``). It never touches a quantized weight. If anything fails
    after the first change, the model is restored exactly and the error is re-raised.

    Args:
        model: a ``transformers.PreTrainedModel``, or a ``peft.PeftModel`` after ``get_peft_model``.
        device: ``"auto"`` (the model's own device), ``"cuda"``, ``"cuda:N"``, ``"rocm"``, ``"mps"`` or ``"cpu"``.
            A CPU model with an accelerator asked for is moved there, except bitsandbytes models, which must be
            loaded there with ``device_map``. A bool here is peft's positional ``use_gradient_checkpointing``.
        target_modules: where adapters will go when ``model`` is not a PeftModel yet: module names, a regex, or a
            ``peft.LoraConfig`` (its ``layers_to_transform`` and ``modules_to_save`` are honoured). None: the
            PeftModel's adapters, else peft's default targets for the model type.
        upcast: ``"adjacent"`` (default): only the norms whose output feeds an adapted layer go to fp32.
            ``"norms"``: every norm. ``"none"``: nothing. ``"peft"``: every non-quantized fp16/bf16 parameter is
            cast to fp32, as peft does (embeddings and lm_head included), but chunked. Parameters of
            ``modules_to_save`` (trained in full) are cast to fp32 under every policy.
        activations: ``"fp32"`` (default): the upcast norms and the embedding hand fp32 on, so adapted layers
            compute in fp32 as with peft, and a frozen bf16/fp16 ``lm_head`` computes in fp32 block by block without
            an fp32 copy of its weight: the same loss curve as peft. ``"layer"``: fp32 inside each
            gradient-checkpointed layer (the upcast norms hand fp32 to the adapted layers, attention and MLP compute
            in fp32), the model's dtype between layers, so the checkpointed layer inputs stay half precision;
            lm_head as in "fp32". ``"native"``: the upcast norms hand on the model's dtype: lowest memory (that of
            no preparation), learns slightly slower in the first steps.
        frozen_norms: how a frozen norm the policy selects gets fp32. ``"compute"`` (default): it computes in fp32
            at call time from its bf16/fp16 parameters (exact in fp32), which keep their dtype: no new bytes, and
            nothing that FSDP, a checkpoint or an optimizer sees changes. ``"upcast"``: its parameters are cast to
            fp32 (version 0.1's behaviour; the same numerics).
        use_gradient_checkpointing: enable transformers' gradient checkpointing (and input gradients where the
            reentrant variant needs them), as peft does.
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint`` (e.g. ``{"use_reentrant": False}``).
        chunk_bytes: bytes of new fp32 tensors per cast chunk; default: the backend's, shrunk under memory pressure.

    Raises:
        ValueError: bad arguments, an unavailable device, a model on another device, nothing matched by
            ``target_modules`` (all before any change).
        MemoryPressureError: the casts would not fit in the free memory measured on a device the model lives on
            (each device of a device_map split is checked on its own; the error names it), before any change.
    """
    device, use_gradient_checkpointing = _peft_positional_compat(device, use_gradient_checkpointing)
    check_options(
        upcast=upcast,
        activations=activations,
        frozen_norms=frozen_norms,
        chunk_bytes=chunk_bytes,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
    )
    index = check_model(model)
    target, move_to = resolve_target(index, device)
    targets = device_targets(target, index.devices, move_to)
    befores = measure_before(targets)
    started = time.perf_counter()

    changes = plan.build(model, upcast, target_modules, frozen_norms, index)
    moved_bytes = _model_bytes(model) if move_to is not None else 0
    shares = share_casts(targets, befores, changes.casts, chunk_bytes, moved_bytes)
    check_fits(shares)

    previous = getattr(model, STATE_ATTRIBUTE, None)
    with Transaction(model, index) as transaction:
        if move_to is not None:
            move_model(model, index.devices[0], move_to, transaction)
        freeze_base_weights(model, index)
        cast_in_chunks(shares, transaction)
        supersede_previous_overrides(previous, transaction)
        handles, guarded = add_dtype_flow_hooks(
            model, index, changes, activations, smallest_chunk(shares).chunk_bytes, transaction
        )
        checkpointing = enable_gradient_checkpointing(
            model, use_gradient_checkpointing, gradient_checkpointing_kwargs, previous
        )
        finish_on_devices(shares)
        devices = measure_after(shares)
        report = build_report(
            target,
            changes,
            activations,
            shares,
            devices,
            time.perf_counter() - started,
            checkpointing,
            move_to,
            guarded,
        )
    retire_previous_hooks(previous)
    remember(model, PrepState(report, handles, checkpointing))
    return model


def report(model: nn.Module) -> PrepReport | None:
    """The PrepReport of the last prepare() on this model, or None if it was never prepared."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    return state.report if state is not None else None


# ---- checks (nothing changed yet) --------------------------------------------------------------------------------


def _peft_positional_compat(device: Any, use_gradient_checkpointing: bool) -> tuple[Any, bool]:
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
) -> None:
    """prepare()'s options, checked before anything is touched (keyword names as prepare() takes them)."""
    checkpointing_kwargs = gradient_checkpointing_kwargs
    if upcast not in plan.POLICIES:
        raise ValueError(f"upcast={upcast!r} is not a policy; use one of {', '.join(map(repr, plan.POLICIES))}")
    if activations not in ACTIVATIONS:
        raise ValueError(
            f"activations={activations!r} is not known; use 'fp32' (peft's numerics), 'layer' (fp32 inside each "
            "checkpointed layer, the model's dtype between layers) or 'native'"
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


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ---- changes (inside the transaction) -------------------------------------------------------------------------------


def move_model(model: nn.Module, original: torch.device, device: torch.device, transaction: Transaction) -> None:
    transaction.on_undo(lambda: model.to(original))
    model.to(device)


def freeze_base_weights(model: nn.Module, index: ModelIndex) -> None:
    """Every base weight frozen, as peft does; a PeftModel's adapters and modules_to_save copies stay trainable."""
    if not is_peft_model(model):
        for param in index.parameters.values():
            param.requires_grad_(False)
        return
    keep = plan.adapter_submodules(index)
    for wrapper in plan.modules_to_save_wrappers(index).values():
        keep.update(id(m) for m in cast(nn.Module, wrapper.modules_to_save).modules())
    for module in index.modules.values():
        if id(module) in keep:
            continue
        for own in module._parameters.values():
            if own is not None:
                own.requires_grad_(False)


def cast_in_chunks(shares: list[DeviceShare], transaction: Transaction) -> None:
    """Each device's casts in its own chunks; one journal undoes them all, newest first."""
    journal = CastJournal()
    transaction.on_undo(journal.undo)
    for share in shares:
        for position, chunk in enumerate(share.chunks):
            journal.apply(chunk)
            if position < len(share.chunks) - 1:
                # peak polling where the allocator keeps no peak (MPS < 2.13, CPU)
                share.samples.append(memory.take(share.target))


def add_dtype_flow_hooks(
    model: nn.Module,
    index: ModelIndex,
    changes: plan.Plan,
    activations: str,
    chunk_bytes: int,
    transaction: Transaction,
) -> tuple[list, int]:
    norms = {index.modules[name]: dtype for name, dtype in changes.upcast_norms.items()}
    compute_norms = [index.modules[name] for name in changes.compute_norms]
    skip = plan.adapter_submodules(index) | {id(m) for m in norms}
    consumers = [m for m in index.modules.values() if id(m) not in skip and is_strict_consumer(m)]
    blocks = checkpoint_blocks(model) if activations == "layer" else []
    handles = install_flow_hooks(
        norms, consumers, activations, input_embeddings(model), chunk_bytes, compute_norms, blocks
    )
    transaction.on_undo(lambda: remove_all(handles))
    return handles, len(consumers)


def remove_all(handles: list) -> None:
    """Newest first: an override stacked on another of the same call comes off before the one it wraps."""
    for handle in reversed(handles):
        handle.remove()


def supersede_previous_overrides(previous: PrepState | None, transaction: Transaction) -> None:
    """This call's instance forwards wrap what the previous call's wrapped, not those (retired after success)."""
    overrides = [h for h in (previous.hook_handles if previous else []) if isinstance(h, ForwardOverride)]

    def mark(superseded: bool) -> None:
        for override in overrides:
            override.superseded = superseded

    mark(True)
    transaction.on_undo(lambda: mark(False))


def enable_gradient_checkpointing(
    model: nn.Module, enabled: bool, kwargs: dict | None, previous: PrepState | None
) -> dict | None:
    """As peft: input gradients unless use_reentrant=False, then transformers' own checkpointing.

    Returns the kwargs used (None: not enabled). A repeat with the same kwargs changes nothing (no duplicate hooks).
    """
    if not enabled:
        return None
    kwargs = dict(kwargs or {})
    base = hf_model(model)
    if previous is not None and previous.checkpointing_kwargs == kwargs and _input_grads_enabled(base):
        return kwargs
    enable_checkpointing(base, kwargs)
    needs_input_grads = kwargs.get("use_reentrant", True)
    if needs_input_grads and not _input_grads_enabled(base):
        call(base, "enable_input_require_grads")
    return kwargs


def _input_grads_enabled(hf_model: nn.Module) -> bool:
    return bool(getattr(hf_model, "_require_grads_hooks", None) or getattr(hf_model, "_require_grads_hook", None))


def retire_previous_hooks(previous: PrepState | None) -> None:
    """The new call's hooks replace the last call's: no duplicates after a repeat."""
    if previous is not None:
        remove_all(previous.hook_handles)


# ---- the record -----------------------------------------------------------------------------------------------------


def build_report(
    target: Target,
    changes: plan.Plan,
    activations: str,
    shares: list[DeviceShare],
    devices: dict[str, DeviceMemory],
    seconds: float,
    checkpointing: dict | None,
    move_to: torch.device | None,
    guarded: int,
) -> PrepReport:
    notes = list(changes.notes)
    if move_to is not None:
        notes.append(f"moved the model from cpu to {move_to} before preparing it")
    if len(devices) > 1:
        notes.append(
            f"the model lives on {', '.join(devices)}: each device's casts were checked against its own "
            "headroom (see devices)"
        )
    quantizers: dict[str, int] = {}
    for kind in changes.quantized.values():
        quantizers[kind] = quantizers.get(kind, 0) + 1
    first = devices[str(target.device)]
    smallest = smallest_chunk(shares)
    return PrepReport(
        backend=target.backend.name,
        device=str(target.device),
        policy=changes.policy,
        activations=activations,
        upcast=[c.name for c in changes.casts],
        already_fp32=changes.already_fp32,
        upcast_norms=list(changes.upcast_norms),
        fp32_compute_norms=list(changes.compute_norms),
        input_guards=guarded,
        skipped_quantized=len(changes.quantized),
        quantizers=quantizers,
        adapters_from=changes.adapter_spec.source if changes.adapter_spec else None,
        chunk_bytes=smallest.chunk_bytes,
        chunk_bytes_source=smallest.chunk_bytes_source,
        chunks=len(chunks_of(shares)),
        required_bytes=sum(share.required for share in shares),
        headroom_bytes=first.before.headroom,
        seconds=seconds,
        trace_seconds=changes.trace_seconds,
        gradient_checkpointing=checkpointing is not None,
        before=first.before,
        after=first.after,
        peak=first.peak,
        notes=notes,
        devices=devices,
    )


def remember(model: nn.Module, state: PrepState) -> None:
    # object.__setattr__: not a submodule or parameter, and invisible to state_dict / save_pretrained.
    object.__setattr__(model, STATE_ATTRIBUTE, state)
