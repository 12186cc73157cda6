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

from .. import backends
from ..backends import Target
from ..memory import snapshots as memory
from ..memory.snapshots import MemorySnapshot
from ..model.hf import call, enable_checkpointing, hf_model, input_embeddings, is_peft_model
from ..model.index import ModelIndex
from ..patches import attention, hub_kernels
from ..patches import token_blocks as blocks
from ..patches.dtype_flow import ForwardOverride, checkpoint_blocks, is_strict_consumer, may_need_input_cast
from ..patches.dtype_flow import install as install_flow_hooks
from . import plan
from .cast import CastJournal
from .devices import (
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
            ``"norms"``: every norm. ``"none"``: nothing. ``"peft"``: every non-quantized fp16/bf16 parameter is
            cast to fp32, as peft does (embeddings and lm_head included), but chunked. Parameters of
            ``modules_to_save`` (trained in full) are cast to fp32 under every policy.
        activations: ``"fp32"`` (default): the upcast norms and the embedding hand fp32 on, so adapted layers
            compute in fp32 as with peft, and a frozen bf16/fp16 ``lm_head`` computes in fp32 block by block without
            an fp32 copy of its weight: the same loss curve as peft. ``"layer"``: fp32 inside each
            gradient-checkpointed layer (the upcast norms hand fp32 to the adapted layers, attention and MLP compute
            in fp32), the model's dtype between layers, so the checkpointed layer inputs stay half precision;
            lm_head as in "fp32". ``"native"``: the upcast norms hand on the model's dtype: lowest memory (that of
            no preparation), learns slightly slower in the first steps. Where q/k/v reach attention in fp32
            ("fp32", "layer", or ``upcast="peft"``) on transformers' sdpa attention, the model is switched to
            ``portable_kbit_sdpa``: sdpa, with k/v expanded to the query heads where the backend says fp32
            grouped-query attention would otherwise leave the fused kernels (README).
        frozen_norms: how a frozen norm the policy selects gets fp32. ``"compute"`` (default): it computes in fp32
            at call time from its bf16/fp16 parameters (exact in fp32), which keep their dtype: no new bytes, and
            nothing that FSDP, a checkpoint or an optimizer sees changes. ``"upcast"``: its parameters are cast to
            fp32 (version 0.1's behaviour; the same numerics).
        use_gradient_checkpointing: enable transformers' gradient checkpointing (and input gradients where the
            reentrant variant needs them), as peft does.
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint`` (e.g. ``{"use_reentrant": False}``);
            without ``use_reentrant``, torch's default ``use_reentrant=True`` is passed explicitly (torch warns).
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
        token_blocks=token_blocks,
    )
    index = check_model(model)
    check_checkpointing_support(model, use_gradient_checkpointing, gradient_checkpointing_kwargs)
    target, move_to = resolve_target(index, device)
    targets = device_targets(target, index.devices, move_to)
    befores = measure_before(targets)
    started = time.perf_counter()

    changes = plan.build(model, upcast, target_modules, frozen_norms, index)
    blocks_plan = plan_token_blocks(model, token_blocks, targets[0], befores[0])
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
        attention_handles, attention_choice = install_fp32_attention(
            model, target, activations, upcast, previous, transaction
        )
        handles += add_token_blocks(model, blocks_plan, transaction)
        checkpointing = enable_gradient_checkpointing(
            model, use_gradient_checkpointing, gradient_checkpointing_kwargs, previous
        )
        handles += keep_inputs_off_the_leaves(model, checkpointing, transaction)
        handles += keep_forwards_through_kernelization(model, handles, transaction)
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
            attention_choice,
            blocks_plan,
        )
    retire_previous_hooks(previous)
    remember(model, PrepState(report, handles + attention_handles, checkpointing))
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
    token_blocks: Any = None,
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
    blocks.check_option(token_blocks)
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


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


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
    every = chunks_of(shares)
    done = 0
    for share in shares:
        for position, chunk in enumerate(share.chunks):
            try:
                journal.apply(chunk)
            except BaseException as error:
                _say_which_chunk(error, done, every, share.device)
                raise
            done += 1
            if position < len(share.chunks) - 1:
                # peak polling where the allocator keeps no peak (MPS < 2.13, CPU)
                share.samples.append(memory.take(share.target))


def _say_which_chunk(
    error: BaseException, index: int, chunks: list[list[plan.ParamCast]], device: str | None = None
) -> None:
    """A note on an error raised while casting: which chunk, what it casts, and for an out-of-memory what to do."""
    add_note = getattr(error, "add_note", None)  # Python 3.11 and later
    if add_note is None:
        return
    chunk = chunks[index]
    new = sum(c.new_bytes for c in chunk) / (1 << 20)
    names = ", ".join(c.name for c in chunk[:3]) + (", ..." if len(chunk) > 3 else "")
    add_note(
        f"portable_kbit: raised while casting chunk {index + 1} of {len(chunks)} to fp32"
        f"{f' on {device}' if device else ''} ({len(chunk)} tensors, "
        f"{new:.1f} MiB new: {names}), after {index} chunks were done."
    )
    if isinstance(error, torch.OutOfMemoryError):
        add_note(
            "portable_kbit: the device ran out of memory after prepare()'s headroom check (something else took "
            "memory meanwhile, or the allocator is capped below what the device reports free). Free memory and call "
            "prepare() again; upcast='adjacent' (the default) casts only a few norms, and computes them in fp32 "
            "without any cast by default."
        )


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
    fallbacks = [m for m in index.modules.values() if id(m) not in skip and may_need_input_cast(m)]
    blocks = checkpoint_blocks(model) if activations == "layer" else []
    handles = install_flow_hooks(
        norms, consumers, activations, input_embeddings(model), chunk_bytes, compute_norms, blocks, fallbacks
    )
    transaction.on_undo(lambda: remove_all(handles))
    return handles, len(consumers) + len(fallbacks)


def install_fp32_attention(
    model: nn.Module,
    target: Target,
    activations: str,
    upcast: str,
    previous: PrepState | None,
    transaction: Transaction,
) -> tuple[list, attention.AttentionChoice]:
    """Where q/k/v will reach attention in fp32 and the model's attention is transformers' sdpa: our sdpa, which
    keeps fp32 grouped-query attention on a fused kernel where the backend says transformers' call would not.

    A repeat takes over the last call's switch; a call that no longer needs it leaves it to retire_previous_hooks.
    """
    fp32_reason = attention.fp32_inside_attention(activations, upcast)
    previous_handles = previous.hook_handles if previous is not None else []
    choice = attention.install(hf_model(model), target.backend, fp32_reason, previous_handles, transaction.on_undo)
    return ([choice.switch] if choice.switch is not None else []), choice


def add_token_blocks(model: nn.Module, blocks_plan: blocks.BlocksPlan | None, transaction: Transaction) -> list:
    """The blocked head/loss (hooks and loss_function) and the blocked MLP forwards, as removable handles."""
    if blocks_plan is None:
        return []
    handles = blocks.install(model, blocks_plan)
    transaction.on_undo(lambda: remove_all(handles))
    return handles


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
    # torch's default (reentrant), said explicitly: torch warns at every checkpointed call without it that a later
    # release will raise (peft's function passes {} and gets the warning)
    kwargs = {"use_reentrant": True, **(kwargs or {})}
    base = hf_model(model)
    if previous is not None and previous.checkpointing_kwargs == kwargs and _input_grads_enabled(base):
        return kwargs
    enable_checkpointing(base, kwargs)
    needs_input_grads = kwargs.get("use_reentrant", True)
    if needs_input_grads and not _input_grads_enabled(base):
        call(base, "enable_input_require_grads")
    return kwargs


def keep_inputs_off_the_leaves(model: nn.Module, checkpointing: dict | None, transaction: Transaction) -> list:
    """With reentrant checkpointing, transformers' input-gradient hook makes the embedding output a leaf that requires
    grad, and a model that adds to it in place (BLT's hash embeddings: `embeddings += ...`) then fails ("a leaf
    Variable that requires grad is being used in an in-place operation"), with peft's function too. A hook after it
    hands on a copy instead: no longer a leaf, the same values and gradients."""
    if checkpointing is None or not checkpointing.get("use_reentrant", True):
        return []
    embeddings = input_embeddings(hf_model(model))
    if embeddings is None:
        return []
    handle = embeddings.register_forward_hook(_copy_of_leaf_output)
    transaction.on_undo(handle.remove)
    return [handle]


def keep_forwards_through_kernelization(model: nn.Module, handles: list, transaction: Transaction) -> list:
    """transformers (5.25+) kernelizes the model again on train()/eval(), which drops instance forwards: this call's
    forward overrides are put back after each kernelization (hub_kernels)."""
    overrides = [h for h in handles if isinstance(h, ForwardOverride)]
    wrappers = hub_kernels.follow_kernelization(hf_model(model), overrides)
    transaction.on_undo(lambda: remove_all(wrappers))
    return wrappers


def _copy_of_leaf_output(module: nn.Module, args: tuple, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.is_leaf and output.requires_grad:
        return output.clone()
    return None


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
    attention_choice: attention.AttentionChoice,
    blocks_plan: blocks.BlocksPlan | None = None,
) -> PrepReport:
    notes = list(changes.notes)
    if move_to is not None:
        notes.append(f"moved the model from cpu to {move_to} before preparing it")
    if attention_choice.note is not None:
        notes.append(attention_choice.note)
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
        attention=attention_choice.implementation,
        attention_reason=attention_choice.reason,
        **_blocks_report(blocks_plan),
        devices=devices,
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
