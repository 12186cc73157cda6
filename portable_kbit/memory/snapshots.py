"""Memory at one moment (MemorySnapshot): the backend's allocator numbers plus psutil's view of the host."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import psutil
import torch

from .. import backends
from ..backends import Target
from ..constants import GiB, MiB


def human_bytes(value: float) -> str:
    """'7.50 GiB', '512.0 MiB', '3.2 KiB', '12 B': the unit that keeps the number readable."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}" if unit == "GiB" else f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    """Memory at one moment, in bytes; None where the backend cannot say.

    allocated: bytes in live tensors on the device (CPU: None; see process_rss).
    reserved: bytes the allocator holds, cache included (MPS: everything the Metal driver holds for the process).
    device_free / device_total: what the device reports; on unified memory device_free is the host's available memory.
    host_available / host_total: psutil.virtual_memory() (MemAvailable on Linux; inactive + free on macOS).
    process_rss: this process's resident memory (on macOS it does not include Metal allocations).
    """

    backend: str
    device: str
    allocated: int | None
    reserved: int | None
    device_free: int | None
    device_total: int | None
    host_available: int
    host_total: int
    process_rss: int
    unified: bool
    taken_at: float
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    headroom: int | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def mib(self, field: str) -> float | None:
        value = getattr(self, field)
        return None if value is None else round(value / MiB, 1)


def take(target: Target) -> MemorySnapshot:
    """Snapshot the target device now."""
    backend, device = target.backend, target.device
    stats = backend.allocator_stats(device)
    virtual = psutil.virtual_memory()
    unified = backend.is_unified(device)
    return MemorySnapshot(
        backend=backend.name,
        device=str(device),
        allocated=stats.allocated,
        reserved=stats.reserved,
        device_free=stats.device_free,
        device_total=stats.device_total,
        host_available=int(virtual.available),
        host_total=int(virtual.total),
        process_rss=int(psutil.Process().memory_info().rss),
        unified=unified,
        taken_at=time.time(),
        peak_allocated=stats.peak_allocated,
        peak_reserved=stats.peak_reserved,
        headroom=backend.headroom(device, stats, int(virtual.available)),
        notes=stats.notes,
    )


def snapshot(device: str | torch.device = "auto") -> MemorySnapshot:
    """A MemorySnapshot of `device` ("auto": the first available accelerator, else the CPU)."""
    return take(backends.resolve(device))


def peak_of(before: MemorySnapshot, samples: list[MemorySnapshot]) -> MemorySnapshot:
    """The highest reading over a window: the allocator's own peak where it keeps one, else the polled maximum."""
    last = samples[-1] if samples else before

    def highest(field: str, peak_field: str | None = None) -> int | None:
        values = [getattr(s, field) for s in [before, *samples] if getattr(s, field) is not None]
        if peak_field is not None:
            values += [getattr(s, peak_field) for s in samples if getattr(s, peak_field) is not None]
        return max(values) if values else None

    return dataclasses.replace(
        last,
        allocated=highest("allocated", "peak_allocated"),
        reserved=highest("reserved", "peak_reserved"),
        process_rss=highest("process_rss") or last.process_rss,
        host_available=min(s.host_available for s in [before, *samples]),
        device_free=min((s.device_free for s in [before, *samples] if s.device_free is not None), default=None),
    )
