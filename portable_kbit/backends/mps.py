"""Apple Silicon (Metal). torch.mps APIs from torch 2.5; torch.accelerator's memory API works on MPS only from 2.13.

Written against the documented APIs (see notes/backend-facts.md); exercised here by contract tests that stand in
for torch.mps, not on Apple hardware.
"""

from __future__ import annotations

import torch

from .base import AllocatorStats, Backend, MiB, accelerator_function, probe

# On 2.9-2.12 torch.accelerator's memory functions raise "Allocator for mps is not a DeviceAllocator".
ACCELERATOR_MEMORY_ON_MPS_FROM = (2, 13)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


class MpsBackend(Backend):
    name = "mps"
    device_type = "mps"
    default_chunk_bytes = 64 * MiB
    unified_chunk_bytes = 64 * MiB
    # optimum-quanto first: bitsandbytes >= 0.50 has an MPS backend too (needs torch >= 2.9), tried second
    preferred_quantizers = ("quanto-int4", "bnb-nf4")

    def why_unavailable(self) -> str | None:
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_built():
            return "this torch build has no MPS support (not a macOS arm64 build)"
        if not mps.is_available():
            return "torch.backends.mps.is_available() is False (needs Apple Silicon and macOS 12.3+)"
        return None

    def device(self, index=None) -> torch.device:
        return torch.device("mps")

    def is_unified(self, device: torch.device) -> bool:
        return True

    def allocator_stats(self, device: torch.device) -> AllocatorStats:
        use_accelerator = torch_version() >= ACCELERATOR_MEMORY_ON_MPS_FROM
        allocated = probe(accelerator_function("memory_allocated") if use_accelerator else None, 0)
        if allocated is None:
            allocated = probe(torch.mps.current_allocated_memory)
        # The driver's total is everything Metal holds for this process, cached pools included.
        reserved = probe(torch.mps.driver_allocated_memory)
        peak_allocated = probe(accelerator_function("max_memory_allocated") if use_accelerator else None, 0)
        recommended = probe(getattr(torch.mps, "recommended_max_memory", None))
        free = None
        if recommended is not None and reserved is not None:
            free = max(0, recommended - reserved)
        notes: tuple[str, ...] = (
            "reserved is torch.mps.driver_allocated_memory (all Metal memory of this process, cache included)",
            "device_total is Metal's recommendedMaxWorkingSetSize; the allocator may grow past it into swap",
            "process_rss does not include Metal allocations on macOS",
        )
        if peak_allocated is None:
            notes += ("no peak API on MPS before torch 2.13: peak is polled between chunks",)
        return AllocatorStats(allocated, reserved, peak_allocated, None, free, recommended, notes)

    def reset_peak(self, device: torch.device) -> None:
        if torch_version() >= ACCELERATOR_MEMORY_ON_MPS_FROM:
            reset = accelerator_function("reset_peak_memory_stats")
            if reset is not None:
                try:
                    reset(0)
                except RuntimeError:
                    pass

    def synchronize(self, device: torch.device) -> None:
        torch.mps.synchronize()

    def release(self, device: torch.device) -> None:
        # Metal's cache shrinks only on empty_cache(); it raises where MPS is unavailable.
        try:
            torch.mps.empty_cache()
        except RuntimeError:
            pass
