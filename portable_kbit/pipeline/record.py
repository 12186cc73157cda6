"""The PrepReport of one prepare() call, from what the call planned, measured and did."""

from __future__ import annotations

from typing import Any

import torch

from ..backends import Target
from ..patches import attention
from ..patches.offload import CheckpointOffload
from ..patches.token_blocks import plan as token_blocks_plan
from ..patches.token_blocks.counts import BlockedCalls
from . import plan
from .devices import DeviceShare, chunks_of, smallest_chunk
from .report import DeviceMemory, PrepReport


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
    blocks_plan: token_blocks_plan.BlocksPlan | None = None,
    block_calls: BlockedCalls | None = None,
    offload_reason: str = "",
    offload: CheckpointOffload | None = None,
    tf32: tuple[bool, str] = (False, "tf32=False"),
    fp32_head: str = "",
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
        attention_calls=attention_choice.patch.calls if attention_choice.patch is not None else None,
        offload_checkpoints=offload is not None,
        offload_reason=offload_reason,
        offload=offload,
        tf32=tf32[0],
        tf32_reason=tf32[1],
        fp32_head=fp32_head,
        **_blocks_report(blocks_plan, block_calls),
        devices=devices,
    )


def _blocks_report(blocks_plan: token_blocks_plan.BlocksPlan | None, calls: BlockedCalls | None) -> dict[str, Any]:
    if blocks_plan is None:
        return {}
    return {
        "token_blocks": blocks_plan.size,
        "token_blocks_source": blocks_plan.source,
        "mlp_token_blocks": blocks_plan.mlp_size,
        "mlp_whole_up_to": blocks_plan.mlp_whole_up_to,
        "blocked_head": blocks_plan.head_name if blocks_plan.head is not None else None,
        "logit_transform": blocks_plan.transform.describe() if blocks_plan.transform is not None else [],
        "blocked_mlps": list(blocks_plan.mlps),
        "blocked_norms": list(blocks_plan.norms),
        "not_blocked": dict(blocks_plan.left_alone),
        "token_block_calls": calls,
    }
