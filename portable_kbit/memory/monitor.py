"""MemoryMonitor: memory telemetry during training, as a transformers TrainerCallback or by hand in a plain loop."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from transformers.trainer_callback import TrainerCallback

from .. import backends
from ..constants import MiB
from . import snapshots
from .snapshots import MemorySnapshot

logger = logging.getLogger(__name__)

#: the release rule vLLM uses on integrated GPUs: the allocator holds at least this much unused ...
RELEASE_MIN_CACHED_BYTES = 512 * MiB
#: ... and the memory still available is at most this fraction of the total
RELEASE_MAX_AVAILABLE_FRACTION = 0.2

LOG_PREFIX = "memory/"


class LowMemoryWarning(UserWarning):
    """Unified memory available fell below MemoryMonitor's threshold (raised once per monitor)."""


class MemoryMonitor(TrainerCallback):
    """Record a MemorySnapshot every N optimizer steps, log it, warn when unified memory runs low, and optionally
    give cached allocator memory back under pressure.

    With a transformers ``Trainer``: ``Trainer(..., callbacks=[MemoryMonitor()])``. Each time the trainer logs, the
    latest readings are added to that log record (``trainer.state.log_history`` and the printed logs) as
    ``memory/allocated_mib``, ``memory/reserved_mib``, ``memory/peak_allocated_mib``, ``memory/peak_reserved_mib``,
    ``memory/host_available_mib``, ``memory/process_rss_mib`` (a reading the device cannot give is left out: a CPU
    has no allocator numbers). Reporting integrations (``report_to=...``) run before user callbacks; call
    ``monitor.attach(trainer)`` to move the monitor first so that they receive the values too.

    In a plain loop: call ``monitor.step()`` after each optimizer step.

    Args:
        every_n_steps: take a snapshot every this many optimizer steps (and whenever the trainer logs).
        device: the device to watch: "auto" (with a Trainer: the model's device; by hand: the first available
            accelerator, else the CPU), "cuda", "cuda:N", "rocm", "mps" or "cpu".
        warn_below_fraction: on unified memory (Jetson, AMD APUs, Apple Silicon, CPU), warn once when the host's
            available memory falls below this fraction of its total. None: never warn.
        release_under_pressure: give the allocator's cached, unused blocks back (the backend's ``release()``) when
            reserved minus allocated is at least 512 MiB and available memory is at most 20% of the total (vLLM's rule
            for integrated GPUs; "available" is the host's on unified memory, the device's free memory otherwise).

    Attributes:
        snapshots: every MemorySnapshot taken, oldest first.
        steps: the optimizer step of each snapshot (same length as ``snapshots``).
        releases: the steps at which the cache was released.
        warned: whether the low-memory warning has fired.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        device: str | torch.device = "auto",
        warn_below_fraction: float | None = 0.1,
        release_under_pressure: bool = False,
    ):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive int")
        if warn_below_fraction is not None and not 0 <= warn_below_fraction <= 1:
            raise ValueError(f"warn_below_fraction={warn_below_fraction!r} must be in [0, 1], or None")
        self.every_n_steps = every_n_steps
        self.device = device
        self.warn_below_fraction = warn_below_fraction
        self.release_under_pressure = release_under_pressure
        self.snapshots: list[MemorySnapshot] = []
        self.steps: list[int] = []
        self.releases: list[int] = []
        self.warned = False
        self._target: backends.Target | None = None
        self._step = 0

    # ---- by hand ------------------------------------------------------------------------------------------------

    def watch(self, model: torch.nn.Module) -> MemoryMonitor:
        """Watch the device `model` lives on (what device="auto" does at the start of a Trainer run)."""
        parameter = next(model.parameters(), None)
        model_device = parameter.device if parameter is not None else None
        self._target = backends.resolve(self.device, model_device)
        return self

    def step(self, step: int | None = None) -> MemorySnapshot | None:
        """Count one optimizer step (or set the step number); take a snapshot when it is due, else return None."""
        self._step = self._step + 1 if step is None else step
        if self._step % self.every_n_steps == 0:
            return self.sample()
        return None

    def sample(self) -> MemorySnapshot:
        """Take a snapshot now: record it, warn if unified memory is low, release the cache if the rule says so."""
        target = self.target
        snap = snapshots.take(target)
        self.snapshots.append(snap)
        self.steps.append(self._step)
        self._check_low_memory(snap)
        if self.release_under_pressure and self.under_pressure(snap):
            target.backend.release(target.device)
            self.releases.append(self._step)
            logger.info("memory pressure at step %d: released the allocator cache on %s", self._step, target.device)
        return snap

    @property
    def target(self) -> backends.Target:
        """The resolved backend and device."""
        if self._target is None:
            self._target = backends.resolve(self.device)
        return self._target

    @staticmethod
    def under_pressure(snap: MemorySnapshot) -> bool:
        """vLLM's rule: reserved - allocated >= 512 MiB and available <= 20% of total."""
        if snap.reserved is None or snap.allocated is None:
            return False
        available, total = (
            (snap.host_available, snap.host_total) if snap.unified else (snap.device_free, snap.device_total)
        )
        if available is None or not total:
            return False
        cached_unused = snap.reserved - snap.allocated
        return cached_unused >= RELEASE_MIN_CACHED_BYTES and available <= RELEASE_MAX_AVAILABLE_FRACTION * total

    def log_values(self, snap: MemorySnapshot | None = None) -> dict[str, float]:
        """The readings of `snap` (default: the latest) as ``{"memory/<name>_mib": MiB}``, unknown ones left out."""
        snap = snap if snap is not None else (self.snapshots[-1] if self.snapshots else None)
        if snap is None:
            return {}
        fields = ("allocated", "reserved", "peak_allocated", "peak_reserved", "host_available", "process_rss")
        readings = {name: snap.mib(name) for name in fields}
        return {f"{LOG_PREFIX}{name}_mib": value for name, value in readings.items() if value is not None}

    def attach(self, trainer: Any) -> Any:
        """Put this monitor first among `trainer`'s callbacks (adding it if missing), so that reporting
        integrations see the memory values it adds to each log; returns the trainer."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return trainer

    def _check_low_memory(self, snap: MemorySnapshot) -> None:
        if self.warned or self.warn_below_fraction is None or not snap.unified or not snap.host_total:
            return
        if snap.host_available < self.warn_below_fraction * snap.host_total:
            self.warned = True
            message = (
                f"unified memory is low on {snap.device}: {snap.host_available / MiB:.0f} MiB available of "
                f"{snap.host_total / MiB:.0f} MiB (below {self.warn_below_fraction:.0%}). Memory the allocator "
                "caches is system memory here; consider a shorter sequence, a smaller batch, or "
                "MemoryMonitor(release_under_pressure=True)."
            )
            logger.warning(message)
            warnings.warn(message, LowMemoryWarning, stacklevel=2)

    # ---- TrainerCallback events ----------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Watch the model's device (device="auto") and start counting from the trainer's step."""
        if model is not None and (self._target is None or self.device == "auto"):
            self.watch(model)
        self._step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        """One optimizer step done: a snapshot every `every_n_steps`."""
        self.step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the latest readings (a fresh snapshot if none was taken at this step) to the trainer's log record."""
        if logs is None:
            return
        if not self.steps or self.steps[-1] != state.global_step:
            self._step = state.global_step
            self.sample()
        values = self.log_values()
        logs.update(values)
        # The trainer appended its record before calling the callbacks: complete that record too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
