"""The errors and warnings portable_kbit raises on purpose; every error is raised before the model is changed (or
once it is restored)."""

from __future__ import annotations

from .constants import MiB


class BackendUnavailableError(ValueError):
    """The device asked for is not usable on this machine."""


class MemoryPressureError(RuntimeError):
    """The planned casts do not fit in the memory measured free on the device; the model was not changed."""

    def __init__(self, device: str, required: int, headroom: int, chunk_bytes: int, hint: str | None = None):
        self.device = device
        self.required = required
        self.headroom = headroom
        self.chunk_bytes = chunk_bytes
        message = (
            f"prepare() needs {required / MiB:.1f} MiB on {device} but only {headroom / MiB:.1f} MiB is available "
            f"(chunks of {chunk_bytes / MiB:.1f} MiB); the model was not changed. "
            + (
                hint
                or "Free memory, use frozen_norms='compute' (the default: norms in fp32 at call time, no new bytes) "
                "with upcast='adjacent', or upcast='none', or pass a smaller chunk_bytes."
            )
        )
        super().__init__(message)


class NoQuantizedWeightWarning(UserWarning):
    """prepare() found no quantized weight in the model: it prepares it all the same, but what it saves is made for
    quantized models (a half-precision model trains with LoRA without prepare() as well)."""


__all__ = ["BackendUnavailableError", "MemoryPressureError", "NoQuantizedWeightWarning"]
