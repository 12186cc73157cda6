"""Bytes of live tensors on one device, op by op: a dispatch mode that runs in real mode or under FakeTensorMode.

Why our own and not ``torch.distributed._tools.mem_tracker.MemTracker`` (torch >= 2.5, private): the forecast runs the
user's real model under ``FakeTensorMode(allow_non_fake_inputs=True)``, so that every hook, instance forward and
attention implementation that prepare() installed is what runs, and the real weights are turned into fake twins as
each op reads them. MemTracker cannot tell such a twin from a new tensor (it would count every weight twice), it
registers a gradient hook on every parameter (frozen ones refuse it), it refuses a second call of the root module, and
its internals changed between torch releases. What is needed here is small: count each storage once, from the op that
made it until it dies, on the device asked for; a storage that an op reads without having made it existed before the
step (weights, quantization statistics, the batch) and counts from the start.

Under FakeTensorMode a model cannot read a value (``bool(mask.all())``, ``step.item()``): transformers checks its
position ids and padding masks that way, and AdamW reads its step counter. For those, small integer, bool and scalar
tensors get a *shadow*: the same op run for real on the CPU, so that a read answers what a real step would see, and
transformers takes the branch it takes in eager mode (no causal mask materialised when nothing is padded). transformers
treats a FakeTensor as "tracing" and would otherwise build the full L x L mask that a real step never builds, which
changes the attention kernel; ``transformers_sees_no_tracing()`` turns that check off for the duration of a fake step.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

#: shadows are kept for integer and bool tensors up to this many elements (position ids, masks, token ids) ...
SHADOW_INTEGER_ELEMENTS = 1 << 22
#: ... and for floating-point tensors this small (the optimizer's step counters, scalars)
SHADOW_FLOAT_ELEMENTS = 16

_SCALAR_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}


def fake_tensor_class() -> type | None:
    """torch's FakeTensor class (None where this torch has none)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return FakeTensor


def is_fake(tensor: Any) -> bool:
    fake = fake_tensor_class()
    return fake is not None and isinstance(tensor, fake)


def storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages a tensor keeps alive (the inner tensors' for a traceable wrapper subclass such as a QTensor)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        out: list[torch.UntypedStorage] = []
        for name in names:
            out += storages(getattr(tensor, name))
        return out
    try:
        return [tensor.untyped_storage()]
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested: no plain storage
        return []


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or results (tensors, and lists, tuples or dicts of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


_WRITTEN: dict[Any, tuple[tuple[int, str], ...]] = {}


def _mutated_tensors(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments an op writes to (from its schema; the positions are cached per op)."""
    written = _WRITTEN.get(func)
    if written is None:
        schema = getattr(func, "_schema", None)
        arguments = schema.arguments if schema is not None else []
        written = tuple(
            (index, argument.name)
            for index, argument in enumerate(arguments)
            if argument.alias_info is not None and argument.alias_info.is_write
        )
        _WRITTEN[func] = written
    out: list[torch.Tensor] = []
    for index, name in written:
        value = args[index] if index < len(args) else kwargs.get(name)
        out += list(_tensors_in(value))
    return out


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, str) and value.split(":")[0] in ("cuda", "mps", "xpu", "meta"):
        return "cpu"
    return value


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of live tensor storages on `device` for everything dispatched inside it.

    static_bytes: storages that existed before (weights, the batch, optimizer state adopted before the step).
    live_bytes / peak_bytes: now and the highest so far (static included); peak_phase: the `phase` label then.
    """

    def __init__(self, device: torch.device, fake_mode: Any = None) -> None:
        super().__init__()
        self.device = device
        self.fake_mode = fake_mode
        self.phase = "setup"
        self.static_bytes = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_phase = "setup"
        # storage -> [bytes counted for it], or None for a fake twin (its real tensor is what is counted)
        self._counted: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._shadows: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fake tensor -> real CPU tensor
        self._twins: list[torch.Tensor] = []  # fake twins of real tensors, kept alive so the conversion memo holds

    # ---- accounting -------------------------------------------------------------------------------------------------

    def counts(self, tensor: torch.Tensor) -> bool:
        device = tensor.device
        if device.type != self.device.type:
            return False
        return self.device.index is None or device.index is None or device.index == self.device.index

    def _add(self, storage: torch.UntypedStorage, counted: bool, static: bool) -> None:
        """Start counting a storage (`counted`: it lives on our device) until it dies."""
        nbytes = storage.nbytes() if counted else 0
        record = [nbytes]
        self._counted[storage] = record
        if not counted:
            return
        weakref.finalize(storage, self._release, record)
        self.live_bytes += nbytes
        if static:
            self.static_bytes += nbytes
        self._update_peak()

    def _release(self, record: list[int]) -> None:
        self.live_bytes -= record[0]

    def _resized(self, tensor: torch.Tensor) -> None:
        """An op with an out= argument may grow its storage (resize_): count the new size."""
        if not self.counts(tensor):
            return
        for storage in storages(tensor):
            record = self._counted.get(storage)
            if record is not None and record[0] != storage.nbytes():
                self.live_bytes += storage.nbytes() - record[0]
                record[0] = storage.nbytes()

    def _update_peak(self) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_phase = self.phase

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes
        self.peak_phase = self.phase

    def adopt(self, tensor: torch.Tensor) -> None:
        """Count a tensor that exists before the step (a weight, a buffer, the batch) once, as static; under a fake
        mode also make its fake twin now, so that the storage the ops see is known to be the same memory."""
        for storage in storages(tensor):
            if storage not in self._counted:
                self._add(storage, self.counts(tensor), static=True)
        if self.fake_mode is not None and not is_fake(tensor):
            try:
                twin = self.fake_mode.from_tensor(tensor)
            except Exception:  # a tensor the fake mode cannot convert: it will say so when an op reads it
                return
            self._twins.append(twin)
            for storage in storages(twin):
                if storage not in self._counted:
                    self._counted[storage] = None  # the same memory as the real tensor, counted once above

    def _track_output(self, tensor: torch.Tensor) -> None:
        counted = self.counts(tensor)
        for storage in storages(tensor):
            if storage not in self._counted:
                self._add(storage, counted, static=False)

    # ---- shadows (fake mode only) ---------------------------------------------------------------------------------

    def shadow(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        """Give a fake tensor the value a real run would have (the batch's token ids)."""
        self._shadows[fake] = real

    def _real_value(self, value: Any) -> tuple[bool, Any]:
        """(known, value on the CPU) for one argument."""
        if not isinstance(value, torch.Tensor):
            return True, _on_cpu(value)
        if is_fake(value):
            real = self._shadows.get(value)
            return (real is not None), real
        # a real tensor read by the op: copied (the op may write to it); from an accelerator only when tiny
        limit = SHADOW_INTEGER_ELEMENTS if value.device.type == "cpu" else SHADOW_FLOAT_ELEMENTS
        small = value.numel() <= limit
        return small, value.detach().to("cpu", copy=True) if small else None

    def _real_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        flat, spec = tree_flatten((args, kwargs))
        real = []
        for value in flat:
            known, converted = self._real_value(value)
            if not known:
                return None
            real.append(converted)
        from torch.utils._pytree import tree_unflatten

        real_args, real_kwargs = tree_unflatten(real, spec)
        return real_args, real_kwargs

    def _run_real(self, func: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        converted = self._real_arguments(args, kwargs)
        if converted is None:
            return False, None
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            try:
                return True, func(*converted[0], **converted[1])
            except Exception:  # the shadow is a convenience: without it the fake mode decides (and may refuse)
                return False, None

    @staticmethod
    def _worth_shadowing(out: Any) -> bool:
        for tensor in _tensors_in(out):
            limit = SHADOW_FLOAT_ELEMENTS if tensor.is_floating_point() else SHADOW_INTEGER_ELEMENTS
            if tensor.is_complex() or tensor.numel() > limit:
                return False
        return True

    def _update_shadows(self, func: Any, args: tuple, kwargs: dict, out: Any, mutated: list[torch.Tensor]) -> None:
        if not self._worth_shadowing(out) or not all(self._worth_shadowing(t) for t in mutated):
            for tensor in mutated:  # written without a shadow computation: a stale value must not be read later
                self._shadows.pop(tensor, None)
            return
        done, real_out = self._run_real(func, args, kwargs)
        if not done:
            for tensor in mutated:
                self._shadows.pop(tensor, None)
            return
        if mutated:  # the real op wrote into the shadows of the mutated arguments already
            return
        flat_fake, _ = tree_flatten(out)
        flat_real, _ = tree_flatten(real_out)
        for fake, real in zip(flat_fake, flat_real, strict=False):
            if isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor) and is_fake(fake):
                self._shadows[fake] = real

    # ---- the mode ---------------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake_mode is not None and func in _SCALAR_READS:
            done, value = self._run_real(func, args, kwargs)
            if done:
                return value
        for tensor in _tensors_in((args, kwargs)):
            if any(s not in self._counted for s in storages(tensor)):
                self.adopt(tensor)  # read before any op made it: it existed before the step
        out = func(*args, **kwargs)
        mutated = _mutated_tensors(func, args, kwargs)
        if self.fake_mode is not None:
            self._update_shadows(func, args, kwargs, out, mutated)
        for tensor in mutated:
            self._resized(tensor)
        for tensor in _tensors_in(out):
            self._track_output(tensor)
        self._update_peak()
        return out


@contextlib.contextmanager
def transformers_sees_no_tracing() -> Iterator[None]:
    """While a fake step runs, transformers must not take a FakeTensor for tracing (torch.compile / export): it then
    materialises the full causal mask and skips the eager checks (packed sequences, padding) whose answers the shadows
    give. ``transformers.utils.import_utils.is_fake_tensor`` is that check (transformers 5); older releases have no
    such check and need nothing. Restored on exit."""
    try:
        from transformers.utils import import_utils
    except ImportError:
        yield
        return
    original = getattr(import_utils, "is_fake_tensor", None)
    if original is None:
        yield
        return
    import_utils.is_fake_tensor = lambda x: False
    try:
        yield
    finally:
        import_utils.is_fake_tensor = original


def _metadata_only_parameter_subclass(x: object) -> bool:
    """A Parameter subclass that keeps Tensor's (disabled) __torch_dispatch__: bitsandbytes' Params4bit / Int8Params.
    For dispatch it is a plain tensor; torch 2.13's FakeTensorMode says so, torch 2.11's refuses it."""
    x_type = type(x)
    return issubclass(x_type, nn.Parameter) and x_type.__torch_dispatch__ is torch.Tensor.__torch_dispatch__


@contextlib.contextmanager
def parameter_subclasses_pass_fake_mode() -> Iterator[None]:
    """While a fake step runs, FakeTensorMode lets a real metadata-only Parameter subclass (a bitsandbytes 4-bit
    weight) through as it lets a Parameter, as torch 2.13 does. Before that (torch 2.11), its subclass check returned
    NotImplemented for every op on such a weight ("Multiple dispatch failed for aten.view.default"), and the forecast
    fell back to real steps. Only where the installed torch still refuses them; restored on exit."""
    from torch._subclasses import fake_tensor

    original = getattr(fake_tensor, "_check_for_subclass_arg", None)
    probe = type("_Probe", (nn.Parameter,), {})(torch.empty(0), requires_grad=False)
    if original is None or not original(probe):
        yield
        return

    def check(x: object) -> bool:
        return bool(original(x)) and not _metadata_only_parameter_subclass(x)

    fake_tensor._check_for_subclass_arg = check
    try:
        yield
    finally:
        fake_tensor._check_for_subclass_arg = original
