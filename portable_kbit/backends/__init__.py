"""Backend registry: one small class per device family, found lazily by name.

Device-specific code lives only in this package.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

import torch

from ..errors import BackendUnavailableError
from .base import AllocatorStats, Backend

# name -> "module:Class", imported on first use (einops' _backends pattern). Order = "auto" preference; cpu last.
REGISTRY: dict[str, str] = {
    "cuda": "portable_kbit.backends.cuda:CudaBackend",
    "rocm": "portable_kbit.backends.rocm:RocmBackend",
    "mps": "portable_kbit.backends.mps:MpsBackend",
    "cpu": "portable_kbit.backends.cpu:CpuBackend",
}

DEVICE_PATTERN = re.compile(r"^(?P<name>[a-z]+)(?::(?P<index>\d+))?$")

_instances: dict[str, Backend] = {}


@dataclasses.dataclass(frozen=True)
class Target:
    """A resolved device request: the backend and the torch device it means."""

    backend: Backend
    device: torch.device


def get(name: str) -> Backend:
    """The backend instance registered under `name` (imported on first use)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(REGISTRY)}")
    if name not in _instances:
        module_name, class_name = REGISTRY[name].split(":")
        _instances[name] = getattr(importlib.import_module(module_name), class_name)()
    return _instances[name]


def available_backends() -> list[str]:
    """Names of the backends usable here, accelerators first, "cpu" always last."""
    return [name for name in REGISTRY if get(name).available()]


def for_device(device: torch.device) -> Backend:
    """The backend that owns an existing torch device (a ROCm GPU is a `cuda` device to torch)."""
    for name in REGISTRY:
        backend = get(name)
        if backend.device_type == device.type and backend.available():
            return backend
    if device.type == "cpu":
        return get("cpu")
    raise BackendUnavailableError(f"no usable backend for torch device {device}; usable here: {available_backends()}")


def resolve(device: str | torch.device = "auto", model_device: torch.device | None = None) -> Target:
    """Turn "auto" | "cuda" | "cuda:N" | "rocm" | "mps" | "cpu" (or a torch.device) into a backend and device.

    "auto" means the device the model already lives on, else the first available accelerator, else cpu.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(
            f"device must be a string such as 'auto', 'cuda:0', 'mps' or 'cpu', not {type(device).__name__}"
        )
    request = device.strip().lower()
    if request == "auto":
        if model_device is not None and model_device.type != "meta":
            backend = for_device(model_device)
            return Target(backend, model_device)
        name = available_backends()[0]
        return Target(get(name), get(name).device())
    match = DEVICE_PATTERN.match(request)
    if match is None or match.group("name") not in REGISTRY:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cuda', 'cuda:N', 'rocm', 'rocm:N', 'mps' or 'cpu'")
    name, index = match.group("name"), match.group("index")
    backend = get(name)
    reason = backend.why_unavailable()
    if reason is not None:
        raise BackendUnavailableError(
            f"device {device!r} is not available: {reason}. Available here: {', '.join(available_backends())}"
        )
    if index is not None and backend.device_type != "cuda":
        raise ValueError(f"device {device!r}: {name} takes no device index; use {name!r}")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise BackendUnavailableError(
            f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} {name} device(s)"
        )
    return Target(backend, backend.device(int(index) if index is not None else None))


__all__ = [
    "REGISTRY",
    "AllocatorStats",
    "Backend",
    "BackendUnavailableError",
    "Target",
    "available_backends",
    "for_device",
    "get",
    "resolve",
]
