"""PrepReport: what one prepare() call did and what it cost."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..constants import MiB
from ..memory.snapshots import MemorySnapshot
from ..patches.attention_call import AttentionCalls
from ..patches.offload import CheckpointOffload
from ..patches.token_blocks.counts import BlockedCalls


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """One device's memory over a prepare() call, and what its casts needed there."""

    before: MemorySnapshot
    after: MemorySnapshot
    peak: MemorySnapshot
    required_bytes: int  # what this device's casts needed at their worst moment (checked against before.headroom)
    chunk_bytes: int  # this device's chunk budget
    chunks: int

    @property
    def allocated_delta(self) -> int | None:
        return _delta(self.after.allocated, self.before.allocated)

    @property
    def peak_allocated_delta(self) -> int | None:
        return _delta(self.peak.allocated, self.before.allocated)

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "peak": self.peak.to_dict(),
            "required_bytes": self.required_bytes,
            "chunk_bytes": self.chunk_bytes,
            "chunks": self.chunks,
        }


@dataclasses.dataclass(frozen=True)
class PrepReport:
    """What one prepare() call did and what it cost.

    ``devices`` has one DeviceMemory per device the model lives on ("cuda:0", "cuda:1" for a device_map split; one
    entry for a one-device model). ``device``, ``before``, ``after``, ``peak`` and ``headroom_bytes`` are those of
    the first of them (the device of the first parameter, usually the embeddings'): for a one-device model, the
    device. ``required_bytes`` and ``chunks`` are totals over the devices; ``chunk_bytes`` is the smallest device
    budget (it also sizes the blocks of an fp32 lm_head).
    """

    backend: str
    device: str
    policy: str
    activations: str
    upcast: list[str]  # parameters this call cast to fp32
    already_fp32: list[str]  # planned parameters that were fp32 before this call (e.g. a second prepare())
    upcast_norms: list[str]  # norm modules whose output dtype the flow hooks control
    fp32_compute_norms: list[str]  # of those, the ones computed in fp32 at call time (parameters not cast)
    input_guards: int  # dtype-strict consumers given an input cast (or, lm_head in "fp32" mode, an fp32 compute)
    skipped_quantized: int
    quantizers: dict[str, int]  # quantizer -> parameter count
    adapters_from: str | None  # "PeftModel", "target_modules", "peft defaults for model_type", or None
    chunk_bytes: int
    chunk_bytes_source: str  # "argument", "backend default", or "shrunk by memory pressure"
    chunks: int
    required_bytes: int
    headroom_bytes: int | None
    seconds: float
    trace_seconds: float  # of `seconds`, the trace forward that found the norms next to the adapted layers
    gradient_checkpointing: bool
    before: MemorySnapshot
    after: MemorySnapshot
    peak: MemorySnapshot
    notes: list[str]
    # the model's attention implementation after the call ("portable_kbit_sdpa" where prepare() switched it), and why
    attention: str | None = None
    attention_reason: str = ""
    # live, where prepare()'s attention is on the model: the path each call took ("sdpa", "sdpa, k/v expanded",
    # "query blocks" ...), and why a long call kept transformers' call
    attention_calls: AttentionCalls | None = None
    # prepare(offload_checkpoints=...): whether checkpointed layer inputs go to host memory and why (or why not), and,
    # where they do, live counts of what went there and the host bytes it holds
    offload_checkpoints: bool = False
    offload_reason: str = ""
    offload: CheckpointOffload | None = None
    # prepare(tf32=...): whether fp32 matmuls use TF32 (torch's process-wide setting) and what was set
    tf32: bool = False
    tf32_reason: str = "tf32=False"
    # how the frozen half-precision linear layers that take fp32 (lm_head in a quantized model) compute their fp32
    # products ("" where none does: no fp32 flow)
    fp32_head: str = ""
    # token blocks (prepare(token_blocks=...)); defaults: not asked for
    token_blocks: int | None = None  # tokens per block (None: no token blocks)
    token_blocks_source: str | None = None  # "argument", "backend default" or "shrunk by memory pressure"
    mlp_token_blocks: int | None = None  # tokens per block of the MLPs (sized from their own widest temporary)
    mlp_whole_up_to: int = 0  # MLP calls of up to this many tokens run whole (0: only those of one block or fewer)
    blocked_head: str | None = None  # the output head whose logits and loss run in blocks (None: not blocked)
    logit_transform: list[str] = dataclasses.field(default_factory=list)  # ops between head and loss, per block
    blocked_mlps: list[str] = dataclasses.field(default_factory=list)  # MLP modules that run in blocks
    blocked_norms: list[str] = dataclasses.field(default_factory=list)  # fp32 norms that run in blocks
    not_blocked: dict[str, str] = dataclasses.field(default_factory=dict)  # module (or layer pattern) -> why not
    # live: how the calls since prepare() ran, per part, blocked or whole with the reason (None: no token blocks)
    token_block_calls: BlockedCalls | None = None
    devices: dict[str, DeviceMemory] = dataclasses.field(default_factory=dict)

    @property
    def allocated_delta(self) -> int | None:
        return _delta(self.after.allocated, self.before.allocated)

    @property
    def reserved_delta(self) -> int | None:
        return _delta(self.after.reserved, self.before.reserved)

    @property
    def peak_allocated_delta(self) -> int | None:
        return _delta(self.peak.allocated, self.before.allocated)

    @property
    def rss_delta(self) -> int:
        return self.after.process_rss - self.before.process_rss

    @property
    def host_available_delta(self) -> int:
        return self.after.host_available - self.before.host_available

    @property
    def changed_anything(self) -> bool:
        return bool(self.upcast)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("before", "after", "peak"):
            out[name] = getattr(self, name).to_dict()
        out["devices"] = {device: memory.to_dict() for device, memory in self.devices.items()}
        out["token_block_calls"] = self.token_block_calls.to_dict() if self.token_block_calls is not None else None
        out["attention_calls"] = self.attention_calls.to_dict() if self.attention_calls is not None else None
        out["offload"] = self.offload.to_dict() if self.offload is not None else None
        out["deltas"] = {
            "allocated": self.allocated_delta,
            "reserved": self.reserved_delta,
            "peak_allocated": self.peak_allocated_delta,
            "process_rss": self.rss_delta,
            "host_available": self.host_available_delta,
        }
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        """A few human lines."""

        def mib(value: int | None) -> str:
            return "n/a" if value is None else f"{value / MiB:+.1f} MiB"

        quantizers = ", ".join(f"{n} {kind}" for kind, n in self.quantizers.items()) or "none"
        lines = [
            f"portable_kbit.prepare on {self.device} ({self.backend}): policy={self.policy}, "
            f"activations={self.activations}",
            f"  norms in fp32: {len(self.upcast_norms)} ({len(self.fp32_compute_norms)} computed in fp32 at call "
            f"time from their own weights, no copy); upcast {len(self.upcast)} parameters to fp32, in "
            f"{self.chunks} chunk(s) of <= {self.chunk_bytes / MiB:.0f} MiB",
            f"  quantized parameters left untouched: {self.skipped_quantized} ({quantizers})",
            f"  input casts: {self.input_guards} (layers that compute in their weight's dtype get their input cast "
            "to it, and hand back the dtype they were given)",
            f"  took {self.seconds * 1000:.1f} ms ({self.trace_seconds * 1000:.1f} ms of it tracing the forward)",
            f"  allocated {mib(self.allocated_delta)}, reserved {mib(self.reserved_delta)}, "
            f"peak allocated {mib(self.peak_allocated_delta)}, process RSS {mib(self.rss_delta)}",
        ]
        if self.attention_reason:
            lines.append(f"  attention: {self.attention} ({self.attention_reason})")
        if self.attention_calls is not None:
            lines.append(f"  {self.attention_calls.line()}")
        if self.offload is not None:
            lines.append(f"  {self.offload.line()}")
        elif self.gradient_checkpointing and self.offload_reason:
            lines.append(f"  checkpointed layer inputs stay on the device ({self.offload_reason})")
        if self.fp32_head:
            lines.append(f"  {self.fp32_head}")
        if self.tf32:
            lines.append(f"  TF32 matmuls: {self.tf32_reason}")
        if self.token_blocks is not None:
            head = "head and loss" if self.blocked_head else "no head"
            transform = f" (logits: {', '.join(self.logit_transform)})" if self.logit_transform else ""
            own_size = self.mlp_token_blocks not in (None, self.token_blocks)
            mlp_size = f" in blocks of {self.mlp_token_blocks} tokens" if own_size and self.blocked_mlps else ""
            if self.mlp_whole_up_to and self.blocked_mlps:
                mlp_size += f" (calls of up to {self.mlp_whole_up_to} tokens whole)"
            lines.append(
                f"  token blocks of {self.token_blocks} tokens ({self.token_blocks_source}): {head}{transform}, "
                f"{len(self.blocked_mlps)} MLPs{mlp_size}, {len(self.blocked_norms)} fp32 norms"
            )
            lines += [f"  not blocked: {name}: {why}" for name, why in self.not_blocked.items()]
            if self.token_block_calls is not None:
                lines += [f"  since prepare(): {line}" for line in self.token_block_calls.lines()]
        if len(self.devices) > 1:
            lines += [
                f"  {device}: allocated {mib(share.allocated_delta)}, peak allocated "
                f"{mib(share.peak_allocated_delta)}, {share.chunks} chunk(s) needing "
                f"{share.required_bytes / MiB:.1f} MiB"
                for device, share in self.devices.items()
            ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)
