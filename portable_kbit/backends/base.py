"""The Backend interface: everything that differs between device families lives behind it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

from ..constants import MiB
from .sdpa import sdpa_kernel_choice

#: how a long attention call runs when transformers' sdpa call would take the math kernel (Backend.long_attention)
QUERY_BLOCKS = "query blocks"
MEMORY_EFFICIENT_KERNEL = "memory-efficient kernel, asked for"


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


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


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
    #: token blocks (prepare(token_blocks="auto")): tokens per block when memory is plentiful (the H100 measurements
    #: of issue 17 used 1024), and the most bytes the widest temporary of one block (its fp32 logits) may take, on a
    #: discrete device and on unified memory; fewer tokens under memory pressure (headroom / pressure divisor)
    default_block_tokens: int = 1024
    max_block_bytes: int = 256 * MiB
    unified_max_block_bytes: int = 128 * MiB
    min_block_tokens: int = 128
    block_token_multiple: int = 64
    #: the MLPs' blocks under token_blocks="auto": "head" (as many tokens as the head's blocks) or "hidden" (about
    #: as many tokens as the hidden width, DeepSpeed TiledMLP's rule, within the same byte cap: a block's
    #: [tokens, intermediate] temporaries then weigh about what the MLP's weights do, and 4-bit weights, which each
    #: block dequantizes again, are dequantized a few times a step instead of once per 1024 tokens)
    mlp_block_rule: str = "head"
    #: MLP calls of no more tokens than the hidden width run whole on a device with memory of its own (their
    #: temporaries then weigh about what the MLP's weights do); longer calls run in blocks as the rule says. Off by
    #: default; backends whose measurements showed it faster turn it on (CUDA: docs/long-sequences.md)
    mlp_whole_up_to_hidden: bool = False
    #: the quantization libraries that have kernels for this device, best first (as "library-scheme" names):
    #: bitsandbytes nf4, then optimum-quanto int4, which runs everywhere
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
        headroom = min(known) + cached_unused
        cap = self.allocator_cap(device)
        if cap is not None and stats.allocated is not None:  # under memory_guard the cap comes first
            headroom = min(headroom, max(0, cap - stats.allocated))
        return headroom

    def allocator_cap(self, device: torch.device) -> int | None:
        """Bytes the allocator may hold under the per-process cap in force (memory_guard's, or one set with torch
        where torch can read it back); None where there is no cap API or no cap below the device's own limit."""
        fraction = self.memory_fraction(device)
        if fraction is None or fraction <= 0 or fraction >= self.max_fraction():
            return None  # 0 means no limit on MPS; the largest fraction is no cap at all
        basis = self.fraction_basis(device)
        return None if basis is None else int(fraction * basis)

    #: what attention costs here when prepare() leaves q/k/v in fp32 (the report's attention reason; docs/api.md)
    fp32_attention: str = "fp32 attention runs as transformers' sdpa calls it"

    def fp32_attention_needs_expanded_kv(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
    ) -> bool:
        """For an fp32 grouped-query attention call (fewer k/v heads than query heads): True when SDPA's fused kernels
        would refuse it with ``enable_gqa=True`` and an expanded one (k/v repeated to the query heads, no
        ``enable_gqa``) should run instead; the refused call runs the math kernel, whose memory grows with L x L.
        False: leave the call to transformers' sdpa. Called once per attention call, with that call's tensors."""
        return False

    #: an attention call of this many query rows or more that only the math kernel would take runs over blocks of
    #: queries instead (patches/query_blocks.py); a shorter one keeps the math kernel, whose scores are small then
    query_blocks_from: int = 1024

    def attention_holds_scores(self, device: torch.device) -> str | None:
        """Why attention here would keep [heads, L, L] scores whatever the activations mode (None: a fused kernel
        takes training calls): prepare() then puts its attention on the model in every mode, so that such calls run
        as ``long_attention`` says."""
        return None

    def long_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        enable_gqa: bool,
    ) -> str | None:
        """How a call of ``query_blocks_from`` rows or more runs, asked with the call as transformers' sdpa will make
        it: None where a fused kernel takes it; QUERY_BLOCKS where only the math kernel would; MEMORY_EFFICIENT_KERNEL
        where a fused kernel takes it only when asked for. Here: the dispatcher's answer (``_fused_sdp_choice``)."""
        kernel = sdpa_kernel_choice(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        return QUERY_BLOCKS if kernel == "MATH" else None

    # ---- checkpointed layer inputs in host memory (prepare(offload_checkpoints=...)) ---------------------------

    def why_no_offload(self, device: torch.device) -> str | None:
        """Why keeping checkpointed layer inputs in host memory cannot help on this device (None: it can)."""
        if self.is_unified(device):
            return f"{self.name}: the device's memory is the host's, so moving tensors to the host frees nothing"
        return None

    def why_no_tf32(self, device: torch.device) -> str | None:
        """None where fp32 matmuls on `device` can run on TF32 tensor cores (prepare(tf32=True)), else why not."""
        return f"{self.name} has no TF32 matmuls (fp32 matmuls here are IEEE fp32)"

    def why_no_fp32_from_bf16(self, device: torch.device) -> str | None:
        """None where an fp32 matmul with a bf16 weight (lm_head's in the fp32 flows) should run as three bf16
        matmuls that write fp32 (patches/fp32_compute.py: the same product, on half-precision hardware), else why
        not: the weight is then upcast block by block and multiplied in fp32."""
        return f"{self.name}: not measured here (fp32 matmuls)"

    def offload_stream(self, device: torch.device) -> object | None:
        """A side stream for the copies between the device and the host (None: they run in line)."""
        return None

    #: host copies in page-locked memory, which a device copy can overlap with compute from
    pins_host_memory: bool = False

    # ---- allocator caps (memory_guard) -------------------------------------------------------------------------

    def can_cap(self, device: torch.device) -> bool:
        """Whether this device's allocator can be capped so that going over raises an out-of-memory error."""
        return False

    def memory_fraction(self, device: torch.device) -> float | None:
        """The allocator's current cap as the backend's own fraction (see set_memory_fraction); None: no cap API."""
        return None

    def set_memory_fraction(self, device: torch.device, fraction: float) -> None:
        """Cap the allocator at `fraction` of what the device's allocator measures against (torch's per-process
        memory fraction)."""
        raise NotImplementedError(
            f"the {self.name} backend cannot cap its allocator: torch has no per-process memory limit for it"
        )

    def fraction_basis(self, device: torch.device) -> int | None:
        """Bytes that an allocator fraction of 1.0 stands for (None: no cap API)."""
        return None

    def max_fraction(self) -> float:
        """The largest fraction the allocator accepts."""
        return 1.0

    def allocatable_fraction(self, device: torch.device) -> tuple[float, str]:
        """The share of a memory budget that a training step's peak *allocated* bytes can reach before the allocator
        runs out, and why (the forecast compares its predicted peak with budget x this). 1.0 here: no caching
        allocator stands between the tensors and the budget."""
        return 1.0, "no caching allocator: the bytes of live tensors are what the budget holds"

    def guard_fraction(
        self, device: torch.device, fraction: float, host_total: int, host_available: int
    ) -> tuple[float, int]:
        """(allocator fraction, bytes) that ``memory_guard(fraction)`` sets: `fraction` of what the allocator
        measures against. Unified backends size it from the host (see the subclasses)."""
        basis = self.fraction_basis(device)
        if basis is None:
            raise NotImplementedError(f"the {self.name} backend cannot cap its allocator")
        return fraction, int(fraction * basis)

    @contextlib.contextmanager
    def preserved_rng(self, device: torch.device) -> Iterator[None]:
        """Random number generator states put back after the block (a calibration step must not shift the user's
        dropout masks). The CPU generator here; accelerators add their own."""
        with torch.random.fork_rng(devices=[]):
            yield

    def chunk_budget(self, headroom: int | None, unified: bool) -> int:
        """Bytes per cast chunk: the backend's default, shrunk under memory pressure."""
        default = self.unified_chunk_bytes if unified else self.default_chunk_bytes
        if headroom is None:
            return default
        divisor = self.unified_pressure_divisor if unified else self.pressure_divisor
        return max(self.min_chunk_bytes, min(default, headroom // divisor))

    def token_block_size(
        self, bytes_per_token: int, headroom: int | None, unified: bool, hidden: int | None = None
    ) -> int:
        """Tokens per block for the blocked head/loss and MLPs: the backend's default, fewer where one block's widest
        temporary (`bytes_per_token` per token: 4 x vocab for fp32 logits) would pass the backend's cap or, under
        memory pressure, headroom / the pressure divisor. A multiple of `block_token_multiple`, at least
        `min_block_tokens`. For the MLPs (`hidden`: their input width) `mlp_block_rule` may make blocks longer."""
        cap = self.unified_max_block_bytes if unified else self.max_block_bytes
        if headroom is not None:
            divisor = self.unified_pressure_divisor if unified else self.pressure_divisor
            cap = min(cap, headroom // divisor)
        tokens = min(self.default_block_tokens, cap // max(1, bytes_per_token))
        if hidden is not None and self.mlp_block_rule == "hidden" and tokens == self.default_block_tokens:
            tokens = max(tokens, min(hidden, cap // max(1, bytes_per_token)))
        tokens -= tokens % self.block_token_multiple
        return max(self.min_block_tokens, tokens)

    def mlp_whole_up_to(self, hidden: int, unified: bool) -> int:
        """MLP calls of up to this many tokens run whole under token_blocks="auto" (0: only those of one block)."""
        return hidden if self.mlp_whole_up_to_hidden and not unified else 0
