"""The Backend interface: everything that differs between device families lives behind it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class AllocatorStats:
    """What a device's allocator can tell; None where it cannot say."""

    allocated: int | None = None
    reserved: int | None = None
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    device_free: int | None = None
    device_total: int | None = None
    notes: tuple[str, ...] = ()


def accelerator_function(name: str) -> Callable | None:
    """`torch.accelerator.<name>` where this torch has it (2.6+, memory API 2.9+, get_memory_info 2.10+), else None."""
    accelerator = getattr(torch, "accelerator", None)
    return getattr(accelerator, name, None) if accelerator is not None else None


def probe(function: Callable | None, *args) -> int | None:
    """Call an allocator probe; None where it is missing or the backend refuses (they raise RuntimeError)."""
    if function is None:
        return None
    try:
        return int(function(*args))
    except (RuntimeError, AssertionError, AttributeError, TypeError, ValueError):
        return None


class Backend:
    """One device family. Subclasses override what their allocator offers; defaults describe a host-only device."""

    name: str = "base"
    device_type: str = "cpu"
    #: bytes per cast chunk when memory is plentiful, on a discrete device and on unified memory
    default_chunk_bytes: int = 256 * MiB
    unified_chunk_bytes: int = 64 * MiB
    #: a chunk never takes more than headroom / this (unified memory is shared with everything else: tighter)
    pressure_divisor: int = 4
    unified_pressure_divisor: int = 8
    #: never below this, or a budget would mean one tiny tensor per chunk
    min_chunk_bytes: int = 1 * MiB
    #: quantizers to try here, best first (names of portable_kbit.tiny.QUANTIZERS): bitsandbytes nf4, then
    #: optimum-quanto int4 as the fallback that runs everywhere
    preferred_quantizers: tuple[str, ...] = ("bnb-nf4", "quanto-int4")

    def available(self) -> bool:
        return self.why_unavailable() is None

    def why_unavailable(self) -> str | None:
        """None if usable here, else a sentence saying why not."""
        return None

    def device(self, index: int | None = None) -> torch.device:
        if index is None:
            return torch.device(self.device_type)
        return torch.device(self.device_type, index)

    def is_unified(self, device: torch.device) -> bool:
        """True when host and device share one memory pool (Jetson, APUs, Apple Silicon, CPU)."""
        return True

    def allocator_stats(self, device: torch.device) -> AllocatorStats:
        return AllocatorStats()

    def reset_peak(self, device: torch.device) -> None:
        """Start a fresh peak window where the allocator keeps one."""

    def synchronize(self, device: torch.device) -> None:
        """Wait for queued work (the casts are asynchronous on accelerators)."""

    def release(self, device: torch.device) -> None:
        """Give cached, unused allocator blocks back to the system."""

    def headroom(self, device: torch.device, stats: AllocatorStats, host_available: int | None) -> int | None:
        """Bytes that new tensors on this device can take now; None where nothing can be measured.

        The tightest of what the device reports free and, on unified memory, what the host has available; plus
        what the caching allocator holds unused, since new tensors reuse those blocks first.
        """
        limits = [stats.device_free]
        if self.is_unified(device):
            limits.append(host_available)
        known = [limit for limit in limits if limit is not None]
        if not known:
            return None
        cached_unused = 0
        if stats.reserved is not None and stats.allocated is not None:
            cached_unused = max(0, stats.reserved - stats.allocated)
        return min(known) + cached_unused

    def chunk_budget(self, headroom: int | None, unified: bool) -> int:
        """Bytes per cast chunk: the backend's default, shrunk under memory pressure."""
        default = self.unified_chunk_bytes if unified else self.default_chunk_bytes
        if headroom is None:
            return default
        divisor = self.unified_pressure_divisor if unified else self.pressure_divisor
        return max(self.min_chunk_bytes, min(default, headroom // divisor))
