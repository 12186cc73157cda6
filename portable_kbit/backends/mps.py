"""Apple Silicon (Metal). torch.mps APIs from torch 2.5; torch.accelerator's memory API works on MPS only from 2.13.

Written against the documented APIs (see docs/backend-facts.md); exercised here by contract tests that stand in
for torch.mps, not on Apple hardware.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..constants import MiB
from .base import (
    MEMORY_EFFICIENT_KERNEL,
    QUERY_BLOCKS,
    AllocatorStats,
    Backend,
    accelerator_function,
    probe,
    torch_version,
)
from .sdpa import probe_efficient_attention

# On 2.9-2.12 torch.accelerator's memory functions raise "Allocator for mps is not a DeviceAllocator".
ACCELERATOR_MEMORY_ON_MPS_FROM = (2, 13)
# The MPS allocator's default high watermark: allocations may grow to this many times Metal's recommended working set
# (into swap) before an out-of-memory error; PYTORCH_MPS_HIGH_WATERMARK_RATIO overrides it.
DEFAULT_HIGH_WATERMARK_RATIO = 1.7


class MpsBackend(Backend):
    name = "mps"
    device_type = "mps"
    default_chunk_bytes = 64 * MiB
    unified_chunk_bytes = 64 * MiB
    #: torch <= 2.11 has no fused attention backward on MPS: training attention is the math path, which keeps an
    #: L x L score matrix per head (and its softmax) for the backward, for every dtype; newer torch has at most an
    #: opt-in memory-efficient kernel. Long calls run over blocks of queries (or on that kernel where the probe finds
    #: it training); expanding k/v gains nothing here.
    fp32_attention = (
        "mps: no fused attention backward (torch <= 2.11; at most an opt-in memory-efficient kernel after): calls "
        "of 1024 query rows or more run over blocks of queries, or on that kernel where a probe finds it training, "
        "never holding L x L scores; k/v are not expanded"
    )

    def fp32_attention_needs_expanded_kv(self, query, key, value, attn_mask, dropout_p, is_causal) -> bool:
        """Never: without a fused attention backward, the expanded call would run the math path as well."""
        return False

    def attention_holds_scores(self, device: torch.device) -> str | None:
        return (
            "mps: transformers' sdpa runs the math kernel here (L x L scores per head) in every mode, so prepare()'s "
            "attention takes calls of 1024 query rows or more: over blocks of queries, or on torch's memory-efficient "
            "kernel where a probe finds it training on this torch"
        )

    def long_attention(self, query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> str | None:
        return MEMORY_EFFICIENT_KERNEL if self.efficient_attention_trains(query.dtype) else QUERY_BLOCKS

    def efficient_attention_trains(self, dtype: torch.dtype) -> bool:
        """Whether torch's memory-efficient SDPA kernel runs a training call (forward and backward) on this device and
        dtype: a probe on tiny tensors, once per dtype, not a version test."""
        if dtype not in self._efficient_attention:
            self._efficient_attention[dtype] = probe_efficient_attention(self.device(), dtype)
        return self._efficient_attention[dtype]

    def __init__(self) -> None:
        self._fraction: float | None = None  # what set_memory_fraction last set (torch has no getter on MPS)
        self._efficient_attention: dict[torch.dtype, bool] = {}

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

    # ---- allocator caps -------------------------------------------------------------------------------------------

    def can_cap(self, device: torch.device) -> bool:
        return True

    def memory_fraction(self, device: torch.device) -> float | None:
        """What set_memory_fraction last set; before that, the high watermark ratio the allocator started with
        (torch has no getter on MPS)."""
        if self._fraction is not None:
            return self._fraction
        try:
            return float(os.environ.get("PYTORCH_MPS_HIGH_WATERMARK_RATIO", DEFAULT_HIGH_WATERMARK_RATIO))
        except ValueError:
            return DEFAULT_HIGH_WATERMARK_RATIO

    def set_memory_fraction(self, device: torch.device, fraction: float) -> None:
        """torch.mps.set_per_process_memory_fraction: a fraction of Metal's recommended working set (0 to 2; 0 means
        no limit). Over it, allocations raise an out-of-memory error instead of growing into swap."""
        torch.mps.set_per_process_memory_fraction(fraction)
        self._fraction = fraction

    def fraction_basis(self, device: torch.device) -> int | None:
        return probe(getattr(torch.mps, "recommended_max_memory", None))

    def max_fraction(self) -> float:
        return 2.0

    def allocatable_fraction(self, device: torch.device) -> tuple[float, str]:
        # MPS keeps its own heaps; what they cost under a cap was never measured (no Apple hardware here)
        return 1.0, "MPS allocator: no allowance for its heaps (not measured)"

    @contextlib.contextmanager
    def preserved_rng(self, device: torch.device) -> Iterator[None]:
        state = None
        try:
            state = torch.mps.get_rng_state()
        except (RuntimeError, AttributeError):
            pass
        with torch.random.fork_rng(devices=[]):
            try:
                yield
            finally:
                if state is not None:
                    torch.mps.set_rng_state(state)

    def release(self, device: torch.device) -> None:
        # Metal's cache shrinks only on empty_cache(); it raises where MPS is unavailable.
        try:
            torch.mps.empty_cache()
        except RuntimeError:
            pass
