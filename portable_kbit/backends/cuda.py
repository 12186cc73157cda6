"""NVIDIA CUDA, Jetson included. `torch.accelerator` where this torch has it, `torch.cuda` before (torch 2.5)."""

from __future__ import annotations

import psutil
import torch

from .base import AllocatorStats, Backend, MiB, accelerator_function, probe


class CudaBackend(Backend):
    name = "cuda"
    device_type = "cuda"
    default_chunk_bytes = 256 * MiB
    unified_chunk_bytes = 64 * MiB
    fp32_attention = (
        "cuda: flash attention takes no fp32, and where the memory-efficient kernel refuses fp32 grouped-query "
        "attention (torch asked per call), k/v are expanded to the query heads so that it runs instead of the math "
        "kernel: O(L) memory instead of O(L^2), for k/v tensors as large as the query's"
    )

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
