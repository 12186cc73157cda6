"""CPU: no allocator API; psutil (memory/snapshots.py) sees everything."""

from __future__ import annotations

import torch

from ..constants import MiB
from .base import Backend, torch_version
from .sdpa import sdpa_kernel_choice

# Where torch cannot say which kernel it would pick: the CPU flash kernel takes fp32 with GQA from torch 2.9 (read
# from torch's sources and docs/backend-facts.md; a version guard only for a torch that cannot be asked).
CPU_FLASH_TAKES_FP32_GQA_FROM = (2, 9)


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    # The host is the device: casts compete with the page cache and every other process.
    default_chunk_bytes = 256 * MiB
    unified_chunk_bytes = 256 * MiB
    fp32_attention = (
        "cpu: torch's CPU flash kernel takes fp32 with grouped-query attention (torch >= 2.9), so transformers' sdpa "
        "call is kept; where torch would run the math kernel instead, k/v are expanded to the query heads"
    )

    def device(self, index=None) -> torch.device:
        return torch.device("cpu")

    def fp32_attention_needs_expanded_kv(self, query, key, value, attn_mask, dropout_p, is_causal) -> bool:
        """Asks torch's dispatcher which kernel the ``enable_gqa`` call gets: the math kernel means expand."""
        kernel = sdpa_kernel_choice(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa=True)
        if kernel is None:  # this torch cannot say: go by the version
            return torch_version() < CPU_FLASH_TAKES_FP32_GQA_FROM
        return kernel == "MATH"
