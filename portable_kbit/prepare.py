"""prepare(): make a quantized model ready for LoRA/QLoRA training without fp32 copies of frozen weights.

Reads top to bottom as the pipeline in DESIGN.md; each step is a function below. Nothing device-specific here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, cast

import torch
from torch import nn

from . import backends, blocks, memory, plan
from .backends import Target
from .cast import CastJournal, chunked, required_bytes
from .errors import MemoryPressureError
from .flow import install as install_flow_hooks
from .flow import is_strict_consumer
from .memory import MemorySnapshot
from .models import call, enable_checkpointing, hf_model, input_embeddings, is_peft_model
from .quantized import quantization_kind
from .report import PrepReport
from .transaction import Transaction

ACTIVATIONS = ("fp32", "native")
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
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    chunk_bytes: int | None = None,
    token_blocks: int | str | None = None,
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
            ``"norms"``: every norm. ``"none"``: nothing. ``"peft"``: every non-quantized fp16/bf16 parameter,
            as peft does (embeddings and lm_head included), but chunked. Parameters of ``modules_to_save`` (trained
            in full) are upcast to fp32 under every policy.
        activations: ``"fp32"`` (default): the upcast norms and the embedding hand fp32 on, so adapted layers
            compute in fp32 as with peft, and a frozen bf16/fp16 ``lm_head`` computes in fp32 block by block without
            an fp32 copy of its weight: the same loss curve as peft. ``"native"``: the upcast norms hand on the
            model's dtype: lowest memory (that of no preparation), learns slightly slower in the first steps.
        use_gradient_checkpointing: enable transformers' gradient checkpointing (and input gradients where the
            reentrant variant needs them), as peft does.
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint`` (e.g. ``{"use_reentrant": False}``).
        chunk_bytes: bytes of new fp32 tensors per cast chunk; default: the backend's, shrunk under memory pressure.
        token_blocks: long sequences in less memory. ``"auto"``: when the model is trained through its forward
            with ``labels`` (training mode), the output head and the loss run in blocks of the backend's block size
            over the tokens, each recomputed in backward, so that the ``[tokens, vocab]`` logits never exist at full
            length (``outputs.logits`` is then None); each decoder layer's MLP does the same in training mode. Only
            calls longer than one block are blocked; those pay one more forward of the head and of each MLP. An
            int: that many tokens per block. None (default): off. ``portable_kbit.report(model)`` says what was
            blocked, and what was left alone and why.

    Raises:
        ValueError: bad arguments, an unavailable device, a model on another device, nothing matched by
            ``target_modules``, an explicit ``token_blocks`` size for a model whose head and loss cannot run in
            blocks (all before any change).
        MemoryPressureError: the casts would not fit in the measured free memory (before any change).
    """
    device, use_gradient_checkpointing = _peft_positional_compat(device, use_gradient_checkpointing)
    check_options(upcast, activations, chunk_bytes, gradient_checkpointing_kwargs, token_blocks)
    check_model(model)
    target, move_to = resolve_target(model, device)
    target.backend.reset_peak(target.device)
    before = memory.take(target)
    started = time.perf_counter()

    changes = plan.build(model, upcast, target_modules)
    blocks_plan = plan_token_blocks(model, token_blocks, target, before)
    budget, budget_source = chunk_budget(target, before, chunk_bytes)
    chunks = chunked(changes.casts, budget)
    required = required_bytes(chunks) + (_model_bytes(model) if move_to is not None else 0)
    check_fits(target, before, required, budget)

    previous = getattr(model, STATE_ATTRIBUTE, None)
    samples: list[MemorySnapshot] = []
    with Transaction(model) as transaction:
        if move_to is not None:
            move_model(model, move_to, transaction)
        freeze_base_weights(model)
        cast_in_chunks(chunks, target, samples, transaction)
        handles, guarded = add_dtype_flow_hooks(model, changes, activations, budget, transaction)
        handles += add_token_blocks(model, blocks_plan, transaction)
        checkpointing = enable_gradient_checkpointing(
            model, use_gradient_checkpointing, gradient_checkpointing_kwargs, previous
        )
        finish_on_device(target)
        after = memory.take(target)
        report = build_report(
            target,
            changes,
            activations,
            budget,
            budget_source,
            chunks,
            required,
            before,
            after,
            samples,
            time.perf_counter() - started,
            checkpointing,
            move_to,
            guarded,
            blocks_plan,
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
    upcast: str, activations: str, chunk_bytes: int | None, checkpointing_kwargs: Any, token_blocks: Any = None
) -> None:
    if upcast not in plan.POLICIES:
        raise ValueError(f"upcast={upcast!r} is not a policy; use one of {', '.join(map(repr, plan.POLICIES))}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r} is not known; use 'fp32' (peft's numerics) or 'native'")
    if chunk_bytes is not None and (
        isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
    ):
        raise ValueError(
            f"chunk_bytes={chunk_bytes!r} must be a positive int (bytes), or None for the backend's default"
        )
    blocks.check_option(token_blocks)
    if checkpointing_kwargs is not None and not isinstance(checkpointing_kwargs, dict):
        raise TypeError(
            f"gradient_checkpointing_kwargs must be a dict or None, not {type(checkpointing_kwargs).__name__}"
        )


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"prepare() takes a torch.nn.Module (a transformers model or a PeftModel), not {type(model).__name__}"
        )
    if next(model.parameters(), None) is None:
        raise ValueError("the model has no parameters: nothing to prepare")
    with torch._C.DisableTorchFunctionSubclass():  # quantized subclasses dispatch every attribute read otherwise
        meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
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


def model_devices(model: nn.Module) -> list[torch.device]:
    seen: dict[torch.device, None] = {}
    # Quantized tensor subclasses route every attribute read through __torch_function__: skip it, we only read .device
    # Parameters only: optimum-quanto keeps each QLinear's activation-scale buffers on the CPU of a GPU/MPS model,
    # which would read as a CPU-offloaded model and refuse every quanto model on an accelerator.
    with torch._C.DisableTorchFunctionSubclass():
        for tensor in model.parameters():
            seen[tensor.device] = None
    return list(seen)


def resolve_target(model: nn.Module, device: Any) -> tuple[Target, torch.device | None]:
    """The backend and device to prepare on, and the device to move a CPU model to (None: no move)."""
    devices = model_devices(model)
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
        quantizers = {k for k in (quantization_kind(p) for p in model.parameters()) if k}
        if any(k.startswith("bitsandbytes") for k in quantizers):
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


def chunk_budget(target: Target, before: MemorySnapshot, chunk_bytes: int | None) -> tuple[int, str]:
    if chunk_bytes is not None:
        return chunk_bytes, "argument"
    default = target.backend.chunk_budget(None, before.unified)
    budget = target.backend.chunk_budget(before.headroom, before.unified)
    return budget, "backend default" if budget == default else "shrunk by memory pressure"


def plan_token_blocks(
    model: nn.Module, token_blocks: int | str | None, target: Target, before: MemorySnapshot
) -> blocks.BlocksPlan | None:
    """What token blocks will cover (a trace of one forward with labels, on the meta device where it can), and the
    block size: the argument, or the backend's for "auto" (shrunk under memory pressure). Refuses an explicit size
    for a model whose head and loss cannot be blocked."""

    def size(bytes_per_token: int) -> tuple[int, str]:
        default = target.backend.token_block_size(bytes_per_token, None, before.unified)
        tokens = target.backend.token_block_size(bytes_per_token, before.headroom, before.unified)
        return tokens, "backend default" if tokens == default else "shrunk by memory pressure"

    return blocks.build_plan(model, token_blocks, size)


def check_fits(target: Target, before: MemorySnapshot, required: int, budget: int) -> None:
    if before.headroom is not None and required > before.headroom:
        raise MemoryPressureError(str(target.device), required, before.headroom, budget)


# ---- changes (inside the transaction) -------------------------------------------------------------------------------


def move_model(model: nn.Module, device: torch.device, transaction: Transaction) -> None:
    original = model_devices(model)[0]
    transaction.on_undo(lambda: model.to(original))
    model.to(device)


def freeze_base_weights(model: nn.Module) -> None:
    """Every base weight frozen, as peft does; a PeftModel's adapters and modules_to_save copies stay trainable."""
    if not is_peft_model(model):
        for param in model.parameters():
            param.requires_grad_(False)
        return
    keep = plan.adapter_submodules(model)
    for wrapper in plan.modules_to_save_wrappers(model).values():
        keep.update(id(m) for m in cast(nn.Module, wrapper.modules_to_save).modules())
    for module in model.modules():
        if id(module) in keep:
            continue
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)


def cast_in_chunks(
    chunks: list[list[plan.ParamCast]], target: Target, samples: list[MemorySnapshot], transaction: Transaction
) -> None:
    journal = CastJournal()
    transaction.on_undo(journal.undo)
    for index, chunk in enumerate(chunks):
        journal.apply(chunk)
        if len(chunks) > 1 and index < len(chunks) - 1:
            samples.append(memory.take(target))  # peak polling where the allocator keeps no peak (MPS < 2.13, CPU)


def add_dtype_flow_hooks(
    model: nn.Module, changes: plan.Plan, activations: str, chunk_bytes: int, transaction: Transaction
) -> tuple[list, int]:
    norms = {model.get_submodule(name): dtype for name, dtype in changes.upcast_norms.items()}
    skip = plan.adapter_submodules(model) | {id(m) for m in norms}
    consumers = [m for m in model.modules() if id(m) not in skip and is_strict_consumer(m)]
    handles = install_flow_hooks(norms, consumers, activations, input_embeddings(model), chunk_bytes)
    transaction.on_undo(lambda: remove_all(handles))
    return handles, len(consumers)


def add_token_blocks(model: nn.Module, blocks_plan: blocks.BlocksPlan | None, transaction: Transaction) -> list:
    """The blocked head/loss (hooks and loss_function) and the blocked MLP forwards, as removable handles."""
    if blocks_plan is None:
        return []
    handles = blocks.install(model, blocks_plan)
    transaction.on_undo(lambda: remove_all(handles))
    return handles


def remove_all(handles: list) -> None:
    for handle in handles:
        handle.remove()


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
        for handle in previous.hook_handles:
            handle.remove()


def finish_on_device(target: Target) -> None:
    # Once, after the whole cast loop: per-module cache releases caused illegal memory accesses elsewhere.
    target.backend.synchronize(target.device)
    target.backend.release(target.device)


# ---- the record -----------------------------------------------------------------------------------------------------


def build_report(
    target,
    changes,
    activations,
    budget,
    budget_source,
    chunks,
    required,
    before,
    after,
    samples,
    seconds,
    checkpointing,
    move_to,
    guarded,
    blocks_plan=None,
) -> PrepReport:
    notes = list(changes.notes)
    if move_to is not None:
        notes.append(f"moved the model from cpu to {move_to} before preparing it")
    quantizers: dict[str, int] = {}
    for kind in changes.quantized.values():
        quantizers[kind] = quantizers.get(kind, 0) + 1
    peak = memory.peak_of(before, [*samples, memory.take(target)])
    return PrepReport(
        backend=target.backend.name,
        device=str(target.device),
        policy=changes.policy,
        activations=activations,
        upcast=[c.name for c in changes.casts],
        already_fp32=changes.already_fp32,
        upcast_norms=list(changes.upcast_norms),
        input_guards=guarded,
        skipped_quantized=len(changes.quantized),
        quantizers=quantizers,
        adapters_from=changes.adapter_spec.source if changes.adapter_spec else None,
        chunk_bytes=budget,
        chunk_bytes_source=budget_source,
        chunks=len(chunks),
        required_bytes=required,
        headroom_bytes=before.headroom,
        seconds=seconds,
        gradient_checkpointing=checkpointing is not None,
        before=before,
        after=after,
        peak=peak,
        notes=notes,
        **_blocks_report(blocks_plan),
    )


def _blocks_report(blocks_plan: blocks.BlocksPlan | None) -> dict[str, Any]:
    if blocks_plan is None:
        return {}
    return {
        "token_blocks": blocks_plan.size,
        "token_blocks_source": blocks_plan.source,
        "blocked_head": blocks_plan.head_name if blocks_plan.head is not None else None,
        "logit_transform": blocks_plan.transform.describe() if blocks_plan.transform is not None else [],
        "blocked_mlps": list(blocks_plan.mlps),
        "not_blocked": dict(blocks_plan.left_alone),
    }


def remember(model: nn.Module, state: PrepState) -> None:
    # object.__setattr__: not a submodule or parameter, and invisible to state_dict / save_pretrained.
    object.__setattr__(model, STATE_ATTRIBUTE, state)
