"""CPU: no allocator API; psutil (in memory.py) sees everything."""

from __future__ import annotations

import torch

from .base import Backend, MiB


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    # The host is the device: casts compete with the page cache and every other process.
    default_chunk_bytes = 256 * MiB
    unified_chunk_bytes = 256 * MiB

    def device(self, index=None) -> torch.device:
        return torch.device("cpu")
