"""portable_kbit: prepare a quantized LLM for LoRA/QLoRA training without spending memory (CUDA, ROCm, MPS, CPU)."""

from .backends import BackendUnavailableError, available_backends
from .errors import MemoryPressureError
from .forecast import Forecast, forecast
from .guard import CannotCapWarning, MemoryGuard, memory_guard
from .memory import MemorySnapshot, snapshot
from .patch import PeftPatch, patch_peft
from .patch import apply_environment_switch as _apply_environment_switch
from .prepare import prepare, report
from .report import DeviceMemory, PrepReport

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CannotCapWarning",
    "DeviceMemory",
    "Forecast",
    "MemoryGuard",
    "MemoryMonitor",
    "MemoryPressureError",
    "MemorySnapshot",
    "PeftPatch",
    "PrepReport",
    "available_backends",
    "forecast",
    "memory_guard",
    "patch_peft",
    "prepare",
    "report",
    "snapshot",
]


def __getattr__(name):
    # MemoryMonitor subclasses transformers' TrainerCallback, whose import takes seconds: load it on first use.
    if name == "MemoryMonitor":
        from .monitor import MemoryMonitor

        return MemoryMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# PORTABLE_KBIT_PATCH_PEFT=1: patch peft's prepare_model_for_kbit_training now, for code that cannot be edited (the
# only case in which importing portable_kbit imports peft). Last: the package is complete when the patch applies.
_apply_environment_switch()
