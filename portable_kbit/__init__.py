"""portable_kbit: prepare a quantized LLM for LoRA/QLoRA training without spending memory (CUDA, ROCm, MPS, CPU)."""

import importlib
from typing import Any

from .backends import BackendUnavailableError, available_backends
from .errors import MemoryPressureError, NoQuantizedWeightWarning
from .memory.forecast import Forecast, forecast
from .memory.guard import CannotCapWarning, MemoryGuard, memory_guard
from .memory.snapshots import MemorySnapshot, snapshot
from .pipeline.patch_peft import PeftArgumentWarning, PeftPatch, patch_peft
from .pipeline.patch_peft import apply_environment_switch as _apply_environment_switch
from .pipeline.prepare import prepare, report
from .pipeline.report import DeviceMemory, PrepReport

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
    "NoQuantizedWeightWarning",
    "PeftArgumentWarning",
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

#: modules that version 0.1 documented at the package's top level (``from portable_kbit import tiny``), and where
#: they live now; imported on first use
MOVED_MODULES = {"tiny": "tools.tiny", "compare": "tools.compare"}


def __getattr__(name: str) -> Any:
    # MemoryMonitor subclasses transformers' TrainerCallback, whose import takes seconds: load it on first use.
    if name == "MemoryMonitor":
        from .memory.monitor import MemoryMonitor

        return MemoryMonitor
    if name in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{MOVED_MODULES[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# PORTABLE_KBIT_PATCH_PEFT=1: patch peft's prepare_model_for_kbit_training now, for code that cannot be edited (the
# only case in which importing portable_kbit imports peft). Last: the package is complete when the patch applies.
_apply_environment_switch()
