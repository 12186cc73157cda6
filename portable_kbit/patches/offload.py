"""Checkpointed layer inputs kept in host memory between the forward and each layer's recompute, where the
accelerator has memory of its own: copied out on a side stream as the forward saves them, copied back when the
backward needs them, the layer before prefetched on the side stream meanwhile.

With gradient checkpointing, what a step keeps on the device between its forward and its backward is mostly each
layer's input (hidden size x 2 bytes x layers per token): the wall of long sequences on a 12 or 16 GiB GPU. The
checkpoint saves those inputs through autograd's saved-tensor hooks (``ctx.save_for_backward`` in the reentrant
variant, the inputs' saver in the non-reentrant one); a layer's checkpoint function is wrapped so that, in its call
only, ``torch.autograd.graph.saved_tensors_hooks`` hands them to ``CheckpointOffload``. Inside the layer, the
checkpoint's own hooks stay innermost: nothing else is moved. Tensors smaller than ``min_bytes``, on another device,
or that would leave the host with less than ``host_margin_bytes`` available stay where they are, counted with the
reason.

Under the memory forecast's fake step (``FakeTensorMode``) the same hooks run with fake twins: the "host copy" is a
fake CPU tensor and the copy back a fake device tensor, prefetch included, with no stream, no pinning and nothing
counted, so that the forecast sees what the real step keeps on the device.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil
import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..memory.livebytes import is_fake

#: a saved tensor smaller than this stays on the device: a copy of it would cost more than the memory it frees
MIN_OFFLOAD_BYTES = 1 << 20


class _Saved:
    """One tensor kept on the host: its copy, the event that says the copy is done, and a prefetched device copy."""

    __slots__ = ("__weakref__", "device", "fake", "host", "loaded", "loaded_event", "nbytes", "previous", "ready")

    def __init__(self, host: torch.Tensor, device: torch.device, ready: Any, previous: _Saved | None) -> None:
        self.host, self.device, self.ready = host, device, ready
        self.fake = is_fake(host)  # the forecast's fake step: no stream, nothing counted
        self.nbytes = host.numel() * host.element_size()
        self.loaded: torch.Tensor | None = None
        self.loaded_event: Any = None
        # the tensor saved before this one (the layer before): prefetched when this one is needed
        self.previous = weakref.ref(previous) if previous is not None else None


class CheckpointOffload:
    """The pack and unpack hooks of one model's checkpoints, and what they did (live counts).

    ``stream``: a side stream for the copies (None: copies run in line, as on a stand-in without streams); ``pin``:
    host copies in page-locked memory (what lets a copy overlap with compute)."""

    def __init__(
        self,
        device: torch.device,
        stream: Any = None,
        pin: bool = False,
        min_bytes: int | None = None,
        host_margin_bytes: int = 2 << 30,
    ) -> None:
        self.device, self.stream, self.pin = device, stream, pin
        self.host_device = torch.device("cpu")  # where the copies go (a CPU stand-in's fake step may name "meta")
        self.min_bytes = MIN_OFFLOAD_BYTES if min_bytes is None else min_bytes
        self.host_margin_bytes = host_margin_bytes
        self.offloaded = 0
        self.kept: Counter[str] = Counter()
        self.host_bytes = 0  # held on the host now
        self.peak_host_bytes = 0
        self._fake_host_bytes = 0  # a fake step's host copies: not allocated, but a real step's would be
        self._by_tensor: WeakIdKeyDictionary = WeakIdKeyDictionary()  # a tensor saved twice is copied once
        self._last: weakref.ref[_Saved] | None = None

    # ---- the hooks ------------------------------------------------------------------------------------------------

    def pack(self, tensor: torch.Tensor) -> Any:
        fake = is_fake(tensor)
        reason = self._why_kept(tensor)
        if reason is not None:
            if not fake:  # the report counts the real steps only
                self.kept[reason] += 1
            return tensor
        saved = self._by_tensor.get(tensor)
        if saved is not None:
            return saved
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.host_device, pin_memory=self.pin and not fake)
        ready = None
        if self.stream is not None and not fake:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor, non_blocking=True)
                ready = self.stream.record_event()
            tensor.record_stream(self.stream)  # the allocator keeps its memory until the copy is done
        else:
            host.copy_(tensor)
        previous = self._last() if self._last is not None else None
        if previous is not None and previous.fake != fake:  # a fake step's tensors never meet a real step's
            previous = None
        saved = _Saved(host, self.device, ready, previous)
        self._by_tensor[tensor] = saved
        self._last = weakref.ref(saved)
        if fake:  # not offloaded for real: the report counts the real steps only
            self._fake_host_bytes += saved.nbytes
            weakref.finalize(saved, self._fake_released, saved.nbytes)
            return saved
        self.offloaded += 1
        self.host_bytes += saved.nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        weakref.finalize(saved, self._released, saved.nbytes)
        return saved

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Saved):
            return packed
        tensor = self._on_device(packed)
        previous = packed.previous() if packed.previous is not None else None
        if previous is not None and previous.loaded is None and (self.stream is not None or previous.fake):
            self._prefetch(previous)
        return tensor

    # ---- inside ---------------------------------------------------------------------------------------------------

    def _why_kept(self, tensor: torch.Tensor) -> str | None:
        # size first: torch's non-reentrant checkpoint saves its inputs beside an empty CPU placeholder (its
        # _NoopSaveInputs' dummy), one per layer call, which is no "tensor on another device" worth reporting
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < max(self.min_bytes, 1):
            return "smaller than a copy is worth"
        if tensor.device != self.device and not (tensor.device.type == self.device.type and self.device.index is None):
            return "on another device"
        if isinstance(tensor, torch.nn.Parameter) or not (type(tensor) is torch.Tensor or is_fake(tensor)):
            return "a parameter or a tensor subclass"
        # a fake step's copies take no host memory: count them as a real step's would, so the forecast keeps on the
        # device what a real step would keep there once the host runs short
        pending = self._fake_host_bytes if is_fake(tensor) else 0
        if psutil.virtual_memory().available - pending - nbytes < self.host_margin_bytes:
            return "the host is short of memory"
        return None

    def _released(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def _fake_released(self, nbytes: int) -> None:
        self._fake_host_bytes -= nbytes

    def _prefetch(self, saved: _Saved) -> None:
        """Start copying `saved` back on the side stream, to overlap with the recompute of the layer after it."""
        if saved.fake:  # what the copy holds on the device, for the forecast to count
            saved.loaded = saved.host.to(saved.device)
            return
        assert self.stream is not None
        if saved.ready is not None:
            self.stream.wait_event(saved.ready)
        with torch.cuda.stream(self.stream):
            saved.loaded = saved.host.to(saved.device, non_blocking=True)
            saved.loaded_event = self.stream.record_event()

    def _on_device(self, saved: _Saved) -> torch.Tensor:
        if saved.loaded is not None:
            if not saved.fake:  # prefetched on the side stream: wait for it, and keep its memory for this stream
                torch.cuda.current_stream(saved.device).wait_event(saved.loaded_event)
                saved.loaded.record_stream(torch.cuda.current_stream(saved.device))
            return saved.loaded
        if saved.ready is not None:
            torch.cuda.current_stream(saved.device).wait_event(saved.ready)
        return saved.host.to(saved.device, non_blocking=self.pin)

    # ---- on a layer -----------------------------------------------------------------------------------------------

    def wrap(self, checkpoint: Callable[..., Any]) -> Callable[..., Any]:
        """A layer's checkpoint function whose call saves its inputs through these hooks (only while grad is on: a
        forward without grad saves nothing)."""

        def offloading_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return checkpoint(function, *args, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint(function, *args, **kwargs)

        return offloading_checkpoint

    def to_dict(self) -> dict[str, Any]:
        return {
            "offloaded": self.offloaded,
            "kept": dict(self.kept),
            "host_bytes": self.host_bytes,
            "peak_host_bytes": self.peak_host_bytes,
            "pinned": self.pin,
        }

    def line(self) -> str:
        kept = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.kept.items()))
        return (
            f"checkpointed layer inputs offloaded to host memory: {self.offloaded} tensors, peak "
            f"{self.peak_host_bytes / (1 << 20):.1f} MiB {'pinned' if self.pin else 'on the host'}"
            + (f"; kept on the device: {kept}" if kept else "")
        )
