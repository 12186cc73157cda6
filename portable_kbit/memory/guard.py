"""memory_guard(): cap the allocator so that going over raises a clean out-of-memory error instead of swapping.

On unified memory (Apple Silicon, Jetson, AMD APUs) running out does not end in an error: the MPS allocator grows to
1.7x Metal's recommended working set by default (into swap), and a Jetson swaps or meets the OOM killer. With a cap,
the allocation that would go over raises ``torch.OutOfMemoryError`` and the process can stop cleanly. How each device
is capped lives in its Backend (``can_cap``, ``memory_fraction``, ``set_memory_fraction``, ``guard_bytes``).
"""

from __future__ import annotations

import warnings
from typing import Any

import psutil
import torch

from .. import backends
from ..constants import MiB


class CannotCapWarning(UserWarning):
    """memory_guard() was asked to cap a device whose allocator torch cannot cap (the CPU): nothing was changed."""


class MemoryGuard:
    """A cap on this process's allocator, in force from the call until ``restore()`` (or the end of a ``with``).

    fraction: the fraction asked for; cap_bytes: what the process may allocate under it; allocator_fraction: what
    was handed to the backend's per-process memory fraction; previous: that setting before the call (None where
    nothing was capped: ``capped`` is False on the CPU).
    """

    def __init__(
        self,
        device: str,
        backend: str,
        fraction: float | None,
        cap_bytes: int | None,
        allocator_fraction: float | None,
        previous: float | None,
        restore_to: Any,
    ) -> None:
        self.device = device
        self.backend = backend
        self.fraction = fraction
        self.cap_bytes = cap_bytes
        self.allocator_fraction = allocator_fraction
        self.previous = previous
        self._restore_to = restore_to
        self.restored = False

    @property
    def capped(self) -> bool:
        return self.allocator_fraction is not None

    def restore(self) -> None:
        """Put the allocator's previous setting back (once; later calls do nothing)."""
        if self.restored:
            return
        self.restored = True
        if self._restore_to is not None:
            self._restore_to()

    def __enter__(self) -> MemoryGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        if not self.capped:
            return f"MemoryGuard({self.device}: not capped)"
        cap = f"{self.cap_bytes / MiB:.0f} MiB" if self.cap_bytes is not None else "?"
        return (
            f"MemoryGuard({self.device}: {cap}, allocator fraction {self.allocator_fraction:.4f}, "
            f"previous {self.previous})"
        )


def _check_fraction(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(
            f"fraction={fraction!r} must be a number in (0, 1]: the share of the device's memory this process may "
            "allocate (above 1, MPS lets allocations run past Metal's recommended working set into swap, which is "
            "what the guard is for avoiding)"
        )
    return float(fraction)


def memory_guard(
    fraction: float = 0.9, device: str | torch.device = "auto", *, cap_bytes: int | None = None
) -> MemoryGuard:
    """Cap this process's allocator so that going over raises ``torch.OutOfMemoryError`` instead of swapping.

    Applied at once; returns a MemoryGuard that is also a context manager (the previous setting comes back on
    exit), and whose ``previous`` is the setting before the call (``guard.restore()`` puts it back)::

        with portable_kbit.memory_guard(0.9):
            trainer.train()

    What `fraction` is a fraction of:
      - CUDA / ROCm, discrete GPU: the device's total memory (``torch.cuda.set_per_process_memory_fraction``).
      - Jetson and AMD APUs (integrated: the GPU's memory is the host's RAM): the host's total memory (psutil), and
        never more than the host's available memory plus what this process's allocator holds, so that the cap comes
        before swap.
      - MPS: Metal's recommended working set (``torch.mps.set_per_process_memory_fraction``; its default lets the
        allocator grow to 1.7x that, into swap). Fractions above 1 are refused everywhere.
      - CPU: torch cannot cap the CPU allocator: a CannotCapWarning, nothing changes, and the guard's ``capped`` is
        False and ``previous`` None (use ulimit or a cgroup to cap a CPU process).

    Args:
        fraction: in (0, 1].
        device: "auto" (the first available accelerator, else the CPU) or a device string.
        cap_bytes: instead of a fraction, the bytes this process may allocate (e.g. ``8 << 30``).
    """
    if cap_bytes is not None and (isinstance(cap_bytes, bool) or not isinstance(cap_bytes, int) or cap_bytes <= 0):
        raise ValueError(f"cap_bytes={cap_bytes!r} must be a positive int of bytes, or None to use fraction")
    share = _check_fraction(fraction) if cap_bytes is None else None
    target = backends.resolve(device)
    backend, where = target.backend, target.device
    if not backend.can_cap(where):
        warnings.warn(
            f"memory_guard: the {backend.name} backend cannot cap its allocator (torch has no per-process limit "
            f"for {where.type}); nothing was changed. Use ulimit -v or a cgroup (systemd-run -p MemoryMax=...) to "
            "cap a CPU process.",
            CannotCapWarning,
            stacklevel=2,
        )
        return MemoryGuard(str(where), backend.name, share, None, None, None, None)
    basis = backend.fraction_basis(where)
    if not basis:
        raise RuntimeError(f"memory_guard: the {backend.name} backend could not say how much memory {where} has")
    if share is not None:
        virtual = psutil.virtual_memory()
        allocator_fraction, cap_bytes = backend.guard_fraction(
            where, share, int(virtual.total), int(virtual.available)
        )
    else:
        assert cap_bytes is not None
        cap_bytes = min(cap_bytes, basis)  # the allocator cannot be allowed more than the device has
        allocator_fraction = cap_bytes / basis
    previous = backend.memory_fraction(where)
    backend.set_memory_fraction(where, allocator_fraction)

    def restore() -> None:
        if previous is not None:
            backend.set_memory_fraction(where, previous)

    return MemoryGuard(str(where), backend.name, share, cap_bytes, allocator_fraction, previous, restore)


__all__ = ["CannotCapWarning", "MemoryGuard", "memory_guard"]
