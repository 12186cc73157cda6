"""NVIDIA CUDA, Jetson included. `torch.accelerator` where this torch has it, `torch.cuda` before (torch 2.5)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import psutil
import torch

from ..constants import MiB
from .base import AllocatorStats, Backend, accelerator_function, probe
from .sdpa import real_tensors_for_fake


@functools.cache
def bf16_matmul_writes_fp32(index: int) -> str | None:
    """None where ``torch.mm`` of two bf16 matrices on CUDA device `index` can write its fp32 accumulator
    (``out_dtype``, torch 2.8 and later), else what the probe call raised. Asked once per device."""
    probe_input = torch.ones(2, 2, dtype=torch.bfloat16, device=torch.device("cuda", index))
    try:
        torch.mm(probe_input, probe_input, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError, AssertionError) as error:
        return f"this torch's bf16 matmuls cannot write fp32 ({type(error).__name__}: {str(error)[:80]})"
    return None


class CudaBackend(Backend):
    name = "cuda"
    device_type = "cuda"
    default_chunk_bytes = 256 * MiB
    unified_chunk_bytes = 64 * MiB
    # H100, Mistral-7B shape, 4096 tokens (benchmarks/results/h100/run7): MLPs whole and the head in blocks 0.521 s,
    # no blocks 0.596 s; Llama-3.1-8B's 12 GiB fit at 21,848 tokens is unchanged (those calls still run in blocks)
    mlp_whole_up_to_hidden = True
    fp32_attention = (
        "cuda: flash attention takes no fp32, and where the memory-efficient kernel refuses fp32 grouped-query "
        "attention (torch asked per call), k/v are expanded to the query heads so that it runs instead of the math "
        "kernel: O(L) memory instead of O(L^2), for k/v tensors as large as the query's"
    )

    def __init__(self) -> None:
        # per device index: what set_memory_fraction last set (read back where torch has no getter)
        self._fractions: dict[int, float] = {}

    def why_unavailable(self) -> str | None:
        if getattr(torch.version, "hip", None):
            return "this torch is a ROCm build; use device='rocm'"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no NVIDIA GPU, or a CPU-only torch build)"
        return None

    def is_unified(self, device: torch.device) -> bool:
        # Jetson (and AMD APUs on the ROCm backend) report is_integrated; present since torch 2.5.
        try:
            return bool(getattr(torch.cuda.get_device_properties(self._index(device)), "is_integrated", False))
        except (RuntimeError, AssertionError):
            return False

    def allocator_stats(self, device: torch.device) -> AllocatorStats:
        index = self._index(device)
        allocated = self._counter("memory_allocated", index)
        reserved = self._counter("memory_reserved", index)
        peak_allocated = self._counter("max_memory_allocated", index)
        peak_reserved = self._counter("max_memory_reserved", index)
        free, total = self._memory_info(index)
        notes: tuple[str, ...] = ()
        if self.is_unified(device):
            # cudaMemGetInfo on an integrated GPU reports roughly MemFree (page cache not counted): it under-reports.
            virtual = psutil.virtual_memory()
            free = int(virtual.available)
            notes = ("unified memory: device_free is the host's MemAvailable (psutil), not cudaMemGetInfo",)
        return AllocatorStats(allocated, reserved, peak_allocated, peak_reserved, free, total, notes)

    def reset_peak(self, device: torch.device) -> None:
        reset = accelerator_function("reset_peak_memory_stats")
        try:
            if reset is not None:
                reset(self._index(device))
            else:
                torch.cuda.reset_peak_memory_stats(self._index(device))
        except (RuntimeError, AssertionError):
            pass

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(self._index(device))

    def release(self, device: torch.device) -> None:
        empty_cache = accelerator_function("empty_cache")
        try:
            if empty_cache is not None:
                empty_cache()
            else:
                torch.cuda.empty_cache()
        except RuntimeError:
            torch.cuda.empty_cache()

    def fp32_attention_needs_expanded_kv(self, query, key, value, attn_mask, dropout_p, is_causal) -> bool:
        """Asks torch whether a fused kernel (flash, memory-efficient, cuDNN) takes the call with ``enable_gqa=True``:
        none does means expand. No version test: a torch whose kernels gain fp32 GQA is used as it is."""
        cuda = torch.backends.cuda
        with real_tensors_for_fake(query, key, value, attn_mask) as (query, key, value, attn_mask):
            try:
                params = cuda.SDPAParams(query, key, value, attn_mask, dropout_p, is_causal, True)
            except TypeError:  # a torch without enable_gqa in SDPA: transformers repeats k/v itself
                return False
            for check_name in ("can_use_flash_attention", "can_use_efficient_attention", "can_use_cudnn_attention"):
                check = getattr(cuda, check_name, None)
                if check is None:
                    continue
                try:
                    if check(params, False):
                        return False
                except RuntimeError:
                    continue
        return True

    pins_host_memory = True

    def why_no_tf32(self, device: torch.device) -> str | None:
        index = self._index(device)
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:  # TF32 tensor cores came with Ampere (compute capability 8.0)
            return f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) has no TF32"
        return None

    def why_no_fp32_from_bf16(self, device: torch.device) -> str | None:
        index = self._index(device)
        try:
            major, minor = torch.cuda.get_device_capability(index)
        except (RuntimeError, AssertionError) as error:  # a device torch cannot ask (a stand-in, a lost context)
            return f"cuda: compute capability unknown ({error})"
        if major < 8:  # bf16 tensor cores came with Ampere
            return f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) has no bf16 tensor cores"
        return bf16_matmul_writes_fp32(index)

    def offload_stream(self, device: torch.device) -> object | None:
        return torch.cuda.Stream(device=self._index(device))

    # ---- allocator caps -------------------------------------------------------------------------------------------

    def can_cap(self, device: torch.device) -> bool:
        return True

    def memory_fraction(self, device: torch.device) -> float | None:
        """torch.cuda.get_per_process_memory_fraction where this torch has it, else the last value set through this
        backend (1.0, torch's default, if none)."""
        index = self._index(device)
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if getter is not None:
            try:
                return float(getter(index))
            except (RuntimeError, AssertionError, TypeError):
                pass
        return self._fractions.get(index, 1.0)

    def set_memory_fraction(self, device: torch.device, fraction: float) -> None:
        index = self._index(device)
        torch.cuda.set_per_process_memory_fraction(fraction, index)
        self._fractions[index] = fraction

    def fraction_basis(self, device: torch.device) -> int | None:
        """The allocator's fraction is of the device's total memory (torch.cuda.get_device_properties)."""
        return int(torch.cuda.get_device_properties(self._index(device)).total_memory)

    def guard_fraction(
        self, device: torch.device, fraction: float, host_total: int, host_available: int
    ) -> tuple[float, int]:
        """Discrete GPU: `fraction` of the device's total memory. Integrated (Jetson; APUs on ROCm): the device
        memory is the host's RAM, and the device's own total may be only an aperture (HIP on APUs), so `fraction`
        of the host's total memory (psutil), and never more than this process can have without swapping: the host's
        available memory plus what the allocator already holds."""
        if not self.is_unified(device):
            return super().guard_fraction(device, fraction, host_total, host_available)
        reserved = self._counter("memory_reserved", self._index(device)) or 0
        basis = int(self.fraction_basis(device) or 0)
        cap = int(min(fraction * host_total, host_available + reserved, basis))
        return min(1.0, cap / basis), cap

    #: The share of an allocator cap that a training step's peak allocated reached at the longest length that still
    #: ran, H100, 8 GiB cap, Mistral-7B shape, peft and the three modes (issue 8's run 2,
    #: benchmarks/results/h100/long_fit.jsonl): 0.890 to 0.905 with torch's default segments, 0.949 to 0.969 with
    #: expandable segments. The rest is the caching allocator's own: free blocks in segments that still hold a live
    #: tensor, which it cannot give back when the cap is reached. Measured on that one device and workload.
    allocatable_default = 0.90
    allocatable_expandable = 0.96
    #: where this family's allocator settings are read when torch cannot say
    allocator_conf_variables: tuple[str, ...] = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")

    def allocatable_fraction(self, device: torch.device) -> tuple[float, str]:
        if self.expandable_segments():
            return self.allocatable_expandable, (
                f"caching allocator with expandable segments: peaks up to {self.allocatable_expandable:.0%} of a cap "
                "ran (H100)"
            )
        return self.allocatable_default, (
            f"caching allocator: peaks up to {self.allocatable_default:.0%} of a cap ran (H100); "
            f"expandable_segments:True in {self.allocator_conf_variables[0]} lets steps reach "
            f"{self.allocatable_expandable:.0%}"
        )

    def expandable_segments(self) -> bool:
        """Whether the caching allocator grows segments in place (expandable_segments:True): torch's own settings
        where it can say (torch 2.13 can, 2.11 cannot; torch's answer also sees a change made at run time), else the
        environment."""
        settings_of = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
        if settings_of is not None:
            settings = str(settings_of())
        else:
            settings = ",".join(os.environ.get(name, "") for name in self.allocator_conf_variables)
        return "expandable_segments:true" in settings.replace(" ", "").lower()

    @contextlib.contextmanager
    def preserved_rng(self, device: torch.device) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self._index(device)]):
            yield

    @staticmethod
    def _counter(name: str, index: int) -> int | None:
        """torch.accelerator.<name> where this torch has it (2.9+), else torch.cuda.<name> (torch 2.5-2.8)."""
        value = probe(accelerator_function(name), index)
        return value if value is not None else probe(getattr(torch.cuda, name), index)

    def _memory_info(self, index: int) -> tuple[int | None, int | None]:
        for get_info in (accelerator_function("get_memory_info"), torch.cuda.mem_get_info):
            if get_info is None:
                continue
            try:
                free, total = get_info(index)
                return int(free), int(total)
            except (RuntimeError, AssertionError, TypeError):
                continue
        return None, None

    @staticmethod
    def _index(device: torch.device) -> int:
        if device.index is not None:
            return device.index
        return torch.cuda.current_device()
