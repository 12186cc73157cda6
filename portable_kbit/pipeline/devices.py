"""Per-device accounting for prepare(): every device the model lives on is measured, budgeted and checked on its own.

A model loaded with ``device_map="auto"`` over two GPUs has its casts on both: the norms of the first layers on
cuda:0, those of the last layers and lm_head on cuda:1. Each device's casts are sized against that device's own
headroom (a full cuda:1 must refuse even when cuda:0 has room), cast in that device's chunks, and the device is
synchronized, released and measured on its own. A one-device model is the case of one share.
"""

from __future__ import annotations

import dataclasses

import torch

from ..backends import Target
from ..errors import MemoryPressureError
from ..memory.snapshots import MemorySnapshot, peak_of, take
from .cast import chunked, required_bytes
from .plan import ParamCast
from .report import DeviceMemory


@dataclasses.dataclass
class DeviceShare:
    """One device's part of a prepare() call: its memory before, its casts in chunks sized to its own headroom."""

    target: Target
    before: MemorySnapshot
    chunk_bytes: int
    chunk_bytes_source: str  # "argument", "backend default", or "shrunk by memory pressure"
    chunks: list[list[ParamCast]]
    required: int  # bytes the casts (and a move of the model onto this device) need at their worst moment
    samples: list[MemorySnapshot] = dataclasses.field(default_factory=list)  # polled between chunks

    @property
    def device(self) -> str:
        return str(self.target.device)


def device_targets(target: Target, devices: list[torch.device], move_to: torch.device | None) -> list[Target]:
    """Each device the model lives on (the one it moves to, when it moves), the prepare target first."""
    if move_to is not None:
        return [target]
    return [target] + [Target(target.backend, d) for d in devices if d != target.device]


def measure_before(targets: list[Target]) -> list[MemorySnapshot]:
    """A fresh peak window and a snapshot on each device, before anything is planned or changed."""
    befores = []
    for target in targets:
        target.backend.reset_peak(target.device)
        befores.append(take(target))
    return befores


def chunk_budget(target: Target, before: MemorySnapshot, chunk_bytes: int | None) -> tuple[int, str]:
    """Bytes per cast chunk on one device, and where that number comes from."""
    if chunk_bytes is not None:
        return chunk_bytes, "argument"
    default = target.backend.chunk_budget(None, before.unified)
    budget = target.backend.chunk_budget(before.headroom, before.unified)
    return budget, "backend default" if budget == default else "shrunk by memory pressure"


def share_casts(
    targets: list[Target],
    befores: list[MemorySnapshot],
    casts: list[ParamCast],
    chunk_bytes: int | None,
    moved_bytes: int = 0,
) -> list[DeviceShare]:
    """Each device's casts, chunked against its own budget. A cast planned on a device the model leaves (a CPU
    model moved to an accelerator) goes to the first target, as do the bytes of the move itself."""
    by_device: dict[torch.device, list[ParamCast]] = {t.device: [] for t in targets}
    for cast in casts:
        by_device.get(cast.device, by_device[targets[0].device]).append(cast)
    shares = []
    for position, (target, before) in enumerate(zip(targets, befores, strict=True)):
        budget, source = chunk_budget(target, before, chunk_bytes)
        chunks = chunked(by_device[target.device], budget)
        required = required_bytes(chunks) + (moved_bytes if position == 0 else 0)
        shares.append(DeviceShare(target, before, budget, source, chunks, required))
    return shares


def check_headroom(shares: list[DeviceShare]) -> None:
    """Refuse, naming the device, when a device's casts need more than its measured headroom (nothing changed)."""
    for share in shares:
        headroom = share.before.headroom
        if headroom is None or share.required <= headroom:
            continue
        hint = None
        if len(shares) > 1:
            hint = (
                "Give that device less of the model (from_pretrained's max_memory, or a device_map), use "
                "frozen_norms='compute' (the default: norms in fp32 at call time, no new bytes) with "
                "upcast='adjacent', or upcast='none', or pass a smaller chunk_bytes."
            )
        raise MemoryPressureError(share.device, share.required, headroom, share.chunk_bytes, hint)


def smallest_chunk(shares: list[DeviceShare]) -> DeviceShare:
    """The share with the smallest chunk budget: its budget also sizes the blocks of an fp32 lm_head."""
    return min(shares, key=lambda share: share.chunk_bytes)


def chunks_of(shares: list[DeviceShare]) -> list[list[ParamCast]]:
    return [chunk for share in shares for chunk in share.chunks]


def finish_on_devices(shares: list[DeviceShare]) -> None:
    """Every device synchronized, then every device's cache released: once each, after the whole cast loop
    (per-module cache releases caused illegal memory accesses elsewhere; releasing before another device's casts
    are done would race them)."""
    for share in shares:
        share.target.backend.synchronize(share.target.device)
    for share in shares:
        share.target.backend.release(share.target.device)


def measure_after(shares: list[DeviceShare]) -> dict[str, DeviceMemory]:
    """Each device's memory before, after and at its peak (the allocator's own where it keeps one, else polled)."""
    out = {}
    for share in shares:
        after = take(share.target)
        out[share.device] = DeviceMemory(
            before=share.before,
            after=after,
            peak=peak_of(share.before, [*share.samples, after]),
            required_bytes=share.required,
            chunk_bytes=share.chunk_bytes,
            chunks=len(share.chunks),
        )
    return out
