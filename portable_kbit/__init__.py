"""portable_kbit: prepare a quantized LLM for LoRA/QLoRA training without spending memory, on CUDA, ROCm, MPS and CPU."""

from .backends import BackendUnavailableError, available_backends
from .errors import MemoryPressureError
from .memory import MemorySnapshot, snapshot
from .prepare import prepare, report
from .report import PrepReport

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MemoryPressureError",
    "MemorySnapshot",
    "PrepReport",
    "available_backends",
    "prepare",
    "report",
    "snapshot",
]
