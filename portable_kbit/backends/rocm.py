"""AMD ROCm (HIP). torch keeps the device type `cuda` on ROCm, so this reuses the CUDA allocator calls."""

from __future__ import annotations

import torch

from ..constants import MiB
from .base import AllocatorStats
from .cuda import CudaBackend


class RocmBackend(CudaBackend):
    mlp_whole_up_to_hidden = False  # measured on CUDA only (CudaBackend); not on ROCm
    name = "rocm"
    device_type = "cuda"
    default_chunk_bytes = 256 * MiB
    unified_chunk_bytes = 64 * MiB
    fp32_attention = (
        "rocm: as on cuda, torch is asked per call whether a fused kernel takes fp32 grouped-query attention; where "
        "none does, k/v are expanded to the query heads so that the memory-efficient kernel can run"
    )

    # HIP reads its own variable first; the fractions are the CUDA allocator's (the same code), not measured on AMD
    allocator_conf_variables = ("PYTORCH_HIP_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")

    def why_unavailable(self) -> str | None:
        if not getattr(torch.version, "hip", None):
            return "this torch is not a ROCm build (torch.version.hip is None)"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False on this ROCm build (no AMD GPU visible)"
        return None

    def why_no_tf32(self, device: torch.device) -> str | None:
        # torch reads the same setting on ROCm, but which AMD GPUs honour it depends on the GPU and hipBLASLt; not
        # measured here, so not offered
        return "rocm: TF32 matmuls are not offered on AMD GPUs (not measured on one)"

    def why_no_fp32_from_bf16(self, device: torch.device) -> str | None:
        # hipBLAS(Lt) may well write fp32 from bf16, and AMD's fp32 matrix cores change the trade; not measured
        return "rocm: lm_head's fp32 products stay fp32 matmuls on AMD GPUs (three bf16 matmuls not measured on one)"

    def allocator_stats(self, device: torch.device) -> AllocatorStats:
        stats = super().allocator_stats(device)
        if self.is_unified(device):
            # APUs (Strix Halo, MI300A): HIP may report only the VRAM aperture or only GTT as total.
            return AllocatorStats(
                stats.allocated,
                stats.reserved,
                stats.peak_allocated,
                stats.peak_reserved,
                stats.device_free,
                stats.device_total,
                (*stats.notes, "APU: device_total is what HIP reports, which may be only the VRAM aperture"),
            )
        return stats
