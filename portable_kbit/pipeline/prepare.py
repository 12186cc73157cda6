"""prepare(): make a quantized model ready for LoRA/QLoRA training without fp32 copies of frozen weights.

``prepare()`` reads top to bottom as the pipeline: checks (nothing changed yet), the trace and the plan, the budget
per device, then the changes inside a transaction (a failure puts everything back), the report. Each step is a
function below or in a module of its own; nothing here is device-specific (that is the backends' part).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, cast

import torch
from torch import nn

from ..backends import Target
from ..memory import snapshots
from ..memory.snapshots import MemorySnapshot
from ..model.hf import hf_model, is_peft_model
from ..model.index import ModelIndex
from ..model.norms import norm_names
from ..model.trace import Trace, trace
from ..patches import adapter_casts, attention
from ..patches.hub_kernels import follow_kernelization
from ..patches.protocol import InstanceForward, PatchSet
from ..patches.tf32 import Tf32Matmuls
from ..patches.token_blocks import plan as token_blocks_plan
from ..patches.token_blocks.counts import BlockedCalls
from . import adapters, plan
from .cast import CastJournal
from .checkpointing import enable_gradient_checkpointing, keep_inputs_off_the_leaves, offload_checkpoint_inputs
from .checks import (
    ACTIVATIONS,
    check_checkpointing_support,
    check_model,
    check_options,
    decide_offload,
    decide_tf32,
    model_bytes,
    peft_positional_compat,
    resolve_target,
    warn_if_not_quantized,
)
from .devices import (
    DeviceShare,
    check_headroom,
    chunks_of,
    device_targets,
    finish_on_devices,
    measure_after,
    measure_before,
    share_casts,
    smallest_chunk,
)
from .numerics import add_dtype_flow, switch_attention
from .record import build_report
from .report import PrepReport
from .transaction import Transaction

__all__ = ["ACTIVATIONS", "STATE_ATTRIBUTE", "PrepState", "prepare", "report"]

STATE_ATTRIBUTE = "_portable_kbit_state"


@dataclasses.dataclass
class PrepState:
    """Kept on the model between calls: the last report, the patches a repeat call supersedes, the checkpointing
    kwargs it may keep."""

    report: PrepReport
    patches: PatchSet
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
    offload_checkpoints: bool | str = "auto",
    tf32: bool = False,
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
            an fp32 copy of its weight: the same loss curve as peft. ``"mixed"``: as ``"fp32"`` (the stream, the
            norms next to adapters, the adapters and lm_head in fp32), but attention's q/k/v are cast to the model's
            dtype for the fused half-precision kernels (output back in fp32), and a frozen MLP (no adapter inside)
            computes in the model's dtype, as without preparation, and hands fp32 back: faster, a numerics change
            (docs/api.md says what was measured). ``"layer"``: fp32 inside each
            gradient-checkpointed layer (the upcast norms hand fp32 to the adapted layers, attention and MLP compute
            in fp32), the model's dtype between layers, so the checkpointed layer inputs stay half precision;
            lm_head as in "fp32". ``"native"``: the upcast norms hand on the model's dtype: lowest memory (that of
            no preparation), learns slightly slower in the first steps. Where q/k/v reach attention in fp32
            ("fp32", "mixed", "layer", or ``upcast="peft"``) on transformers' sdpa attention, the model is switched to
            ``portable_kbit_sdpa``: sdpa, with k/v expanded to the query heads where the backend says fp32
            grouped-query attention would otherwise leave the fused kernels (docs/api.md).
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
            length (``outputs.logits`` is then None); each decoder layer's MLP, and each norm of the hidden states,
            does the same in training mode. Only calls longer than one block are blocked; those pay one more forward
            of the head, of each norm, and of each MLP except a plain one under non-reentrant checkpointing
            (docs/long-sequences.md). An
            int: that many tokens per block. None (default): off. ``portable_kbit.report(model)`` says what was
            blocked, and what was left alone and why; its ``token_block_calls`` count, as training runs, the calls
            run in blocks and those run whole, with the reason.
        offload_checkpoints: where the accelerator has memory of its own (a discrete CUDA or ROCm GPU), the layer
            inputs that gradient checkpointing keeps between the forward and the backward go to (pinned) host memory,
            copied on a side stream, and come back for each layer's recompute, the layer before prefetched: the
            memory that limits long sequences. ``True``: on (refused before any change on unified memory, the CPU,
            without checkpointing, or with less than 2 GiB available on the host). ``"auto"`` (default): off for now,
            until it is measured to pay (the report says why). ``False``: off. ``report(model).offload`` counts what
            went to the host and the host bytes it holds.
        tf32: ``True``: the fp32 matmuls of the flow (the adapters', lm_head's where it is upcast in blocks rather than
            computed from bf16 parts, a base layer that computes in its fp32 input's dtype) run on TF32 tensor cores:
            inputs rounded to a 10-bit mantissa, sums in fp32; a numerics change, and faster (docs/api.md says what was
            measured). It sets torch's CUDA fp32 matmul precision for the whole process, as
            ``TrainingArguments(tf32=True)`` does (torch reads it in the backward too, outside any scope prepare()
            could open); a repeat prepare() without it puts the previous setting back. Refused before any change where
            the device has no TF32 (before NVIDIA Ampere, ROCm, MPS, the CPU). ``False`` (default): torch's setting is
            left as it is.

    Raises:
        ValueError: bad arguments, an unavailable device, a model on another device, nothing matched by
            ``target_modules``, an explicit ``token_blocks`` size for a model whose head and loss cannot run in
            blocks (all before any change).
        MemoryPressureError: the casts would not fit in the free memory measured on a device the model lives on
            (each device of a device_map split is checked on its own; the error names it), before any change.
    """
    device, use_gradient_checkpointing = peft_positional_compat(device, use_gradient_checkpointing)
    check_options(
        upcast=upcast,
        activations=activations,
        frozen_norms=frozen_norms,
        chunk_bytes=chunk_bytes,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
        token_blocks=token_blocks,
        offload_checkpoints=offload_checkpoints,
        tf32=tf32,
    )
    index = check_model(model)
    warn_if_not_quantized(index)
    check_checkpointing_support(model, use_gradient_checkpointing, gradient_checkpointing_kwargs)
    target, move_to = resolve_target(index, device)
    targets = device_targets(target, index.devices, move_to)
    befores = measure_before(targets)
    started = time.perf_counter()

    changes, found = planned_changes(model, upcast, target_modules, frozen_norms, token_blocks, index)
    blocks_plan = plan_token_blocks(model, found, token_blocks, targets[0], befores[0], index)
    offload = decide_offload(offload_checkpoints, target, befores[0].host_available, use_gradient_checkpointing)
    matmuls = decide_tf32(tf32, target, activations)
    moved = model_bytes(model) if move_to is not None else 0
    shares = share_casts(targets, befores, changes.casts, chunk_bytes, moved)
    check_headroom(shares)

    previous: PrepState | None = getattr(model, STATE_ATTRIBUTE, None)
    had_fp32_attention = previous is not None and any(
        p.is_live() for p in previous.patches.of_type(attention.AttentionImplementation)
    )
    with Transaction(model, index) as transaction:
        transaction.patches.supersede(previous.patches if previous is not None else None)
        if move_to is not None:
            move_model(model, index.devices[0], move_to, transaction)
        freeze_base_weights(model, index)
        cast_in_chunks(shares, transaction.journal)
        chunk = smallest_chunk(shares).chunk_bytes
        guarded, fp32_head = add_dtype_flow(model, index, changes, found, activations, chunk, target, transaction)
        attention_choice = switch_attention(model, index, target, activations, upcast, had_fp32_attention, transaction)
        block_calls = add_token_blocks(model, blocks_plan, transaction)
        transaction.patches.apply(adapter_casts.ShareAdapterCasts(index.modules.values()))  # one cast per input
        checkpointing = enable_gradient_checkpointing(
            model,
            use_gradient_checkpointing,
            gradient_checkpointing_kwargs,
            previous.checkpointing_kwargs if previous is not None else None,
        )
        keep_inputs_off_the_leaves(model, checkpointing, transaction)
        offloaded = offload_checkpoint_inputs(model, offload[0], target, transaction)
        keep_forwards_through_kernelization(model, transaction)
        tf32_setting = use_tf32_matmuls(matmuls[0], transaction)
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
            block_calls,
            offload[1],
            offloaded,
            (tf32_setting is not None, matmuls[1] + (f" ({tf32_setting.describe()})" if tf32_setting else "")),
            fp32_head,
        )
    remember(model, PrepState(report, transaction.patches, checkpointing))
    return model


def report(model: nn.Module) -> PrepReport | None:
    """The PrepReport of the last prepare() on this model, or None if it was never prepared."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    return state.report if state is not None else None


# ---- what to change (nothing changed yet) ---------------------------------------------------------------------------


def planned_changes(
    model: nn.Module,
    upcast: str = "adjacent",
    target_modules: Any = None,
    frozen_norms: str = "compute",
    token_blocks: int | str | None = None,
    index: ModelIndex | None = None,
) -> tuple[plan.Plan, Trace | None]:
    """What prepare() will change, worked out without changing anything: where adapters go, the one trace (where the
    plan or token blocks need it), the plan. Returns the plan and the trace."""
    index = index or ModelIndex(model)
    spec = where_adapters_go(model, upcast, target_modules, index)
    found = trace_once(model, upcast, spec, token_blocks)
    return plan.build(model, upcast, spec, found, frozen_norms, index), found


def where_adapters_go(
    model: nn.Module, upcast: str, target_modules: Any, index: ModelIndex
) -> adapters.AdapterSpec | None:
    """The adapted modules, where the plan needs them (None: it does not, or nothing says where they go)."""
    if not plan.needs_adapters(model, upcast, target_modules):
        return None
    return adapters.adapter_spec(model, target_modules, index)


def trace_once(
    model: nn.Module, upcast: str, spec: adapters.AdapterSpec | None, token_blocks: int | str | None
) -> Trace | None:
    """The one trace of the forward, where the plan (adjacent norms) or token blocks need it (None: neither)."""
    if not plan.needs_trace(upcast, spec) and token_blocks is None:
        return None
    return trace(model, spec.adapted if spec is not None else ())


def plan_token_blocks(
    model: nn.Module,
    found: Trace | None,
    token_blocks: int | str | None,
    target: Target,
    before: MemorySnapshot,
    index: ModelIndex,
) -> token_blocks_plan.BlocksPlan | None:
    """What token blocks will cover (from the trace, and the model's norms) and the block size: the argument, or the
    backend's for "auto" (shrunk under memory pressure). Refuses an explicit size for a model whose head and loss
    cannot be blocked."""
    if token_blocks is None or found is None:
        return None
    norms = {name: index.modules[name] for name in norm_names(index)}
    return token_blocks_plan.build(model, found, token_blocks, target.backend, before.headroom, before.unified, norms)


# ---- the changes (inside the transaction) ---------------------------------------------------------------------------


def move_model(model: nn.Module, original: torch.device, device: torch.device, transaction: Transaction) -> None:
    transaction.on_undo(lambda: model.to(original))
    model.to(device)


def freeze_base_weights(model: nn.Module, index: ModelIndex) -> None:
    """Every base weight frozen, as peft does; a PeftModel's adapters and modules_to_save copies stay trainable."""
    if not is_peft_model(model):
        for param in index.parameters.values():
            param.requires_grad_(False)
        return
    keep = adapters.adapter_submodules(index)
    for wrapper in adapters.modules_to_save_wrappers(index).values():
        keep.update(id(m) for m in cast(nn.Module, wrapper.modules_to_save).modules())
    for module in index.modules.values():
        if id(module) in keep:
            continue
        for own in module._parameters.values():
            if own is not None:
                own.requires_grad_(False)


def cast_in_chunks(shares: list[DeviceShare], journal: CastJournal) -> None:
    """Each device's casts in its own chunks, each recorded in the journal (undone newest first on failure)."""
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
                share.samples.append(snapshots.take(share.target))


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


def add_token_blocks(
    model: nn.Module, blocks_plan: token_blocks_plan.BlocksPlan | None, transaction: Transaction
) -> BlockedCalls | None:
    """The blocked head/loss and MLP forwards; returns the live counts of what their calls did."""
    if blocks_plan is None:
        return None
    counts = BlockedCalls()
    transaction.patches.extend(token_blocks_plan.patches(model, blocks_plan, counts))
    return counts


def use_tf32_matmuls(enabled: bool, transaction: Transaction) -> Tf32Matmuls | None:
    """torch's CUDA fp32 matmul precision set to TF32 (patches/tf32.py); the last change, so that nothing after it
    can fail and leave the process setting changed (the transaction would put it back all the same)."""
    if not enabled:
        return None
    return transaction.patches.apply(Tf32Matmuls())


def keep_forwards_through_kernelization(model: nn.Module, transaction: Transaction) -> None:
    """transformers (5.25+) kernelizes the model again on train()/eval(), which drops instance forwards: this call's
    instance forwards are put back after each kernelization (patches/hub_kernels.py)."""
    forwards = transaction.patches.of_type(InstanceForward)
    transaction.patches.extend(list(follow_kernelization(hf_model(model), forwards)))


def remember(model: nn.Module, state: PrepState) -> None:
    # object.__setattr__: not a submodule or parameter, and invisible to state_dict / save_pretrained.
    object.__setattr__(model, STATE_ATTRIBUTE, state)
