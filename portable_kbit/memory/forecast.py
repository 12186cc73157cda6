"""forecast(): the peak memory of one training step at each sequence length, before running it.

How (see ``Forecast.method``):

1. A *fake step*: the model as it will be trained (prepare()'s hooks and instance forwards, peft's adapters, gradient
   checkpointing, the attention implementation: whatever is installed is what runs) does one training step in training
   mode under ``FakeTensorMode``: forward with labels, backward, an AdamW step on the trainable parameters (its state
   created first, as in every step after the first). Tensors have shapes, dtypes and devices but no data, so nothing
   is allocated and the length costs nothing; the real weights are read through fake twins. ``LiveTensorBytes``
   counts the bytes of live tensors on the device op by op; the attention kernel a length gets is the one the
   dispatcher picks for those shapes on that device. The model is restored exactly afterwards (grads, modes, tensors).
2. A *calibration*: one real step at the shortest length (256 tokens, or less if asked for), the only device
   allocation the forecast makes. Its measured peak (the allocator's peak allocated on an accelerator; on the CPU the
   bytes of live torch tensors) minus the fake step's count at that length is what tensor accounting misses (the
   cuBLAS workspace, allocator rounding, tensors held outside the model); it is added to every prediction.
3. Where the fake step cannot run (a model FakeTensorMode cannot take), real steps at three short lengths are fitted
   with peak(L) = a + bL + cL^2 (c >= 0) and extrapolated; the Forecast says so.

``longest_seq_len`` is the longest multiple of 256 up to the model's maximum positions whose predicted peak fits the
budget, found by further fake steps (a bracketed search) or from the fit. "Fits" allows for the device's allocator:
a caching allocator cannot fill a cap with tensors (part of what it holds is free blocks in segments that still hold
a live one), so a peak fits when it is within ``allocatable_bytes``, the budget times the share the backend says
steps reached (``Backend.allocatable_fraction``: 0.90 of a cap on CUDA, 0.96 with expandable segments, measured on
the H100; 1.0 on the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import backends
from ..backends import Target
from ..model.hf import hf_model, input_embeddings, set_training_flags
from . import snapshots as memory
from .livebytes import LiveTensorBytes, is_fake, parameter_subclasses_pass_fake_mode, transformers_sees_no_tracing
from .snapshots import MiB, human_bytes

DEFAULT_SEQ_LENS = (512, 1024, 2048, 4096)
#: the calibration step's length (or the shortest length asked for, if shorter)
CALIBRATION_SEQ_LEN = 256
#: longest_seq_len is a multiple of this
SEQ_LEN_STEP = 256
#: the search ceiling where the config names no maximum position
DEFAULT_MAX_SEQ_LEN = 32768
#: fake steps the search for longest_seq_len may take beyond the requested lengths
MAX_SEARCH_STEPS = 12
METHODS = ("auto", "fake", "extrapolate")


@dataclasses.dataclass
class Forecast:
    """Predicted peak bytes of one training step (forward, backward, optimizer step; weights included) per length.

    peak_bytes: {seq_len: bytes}: the allocator's peak allocated on an accelerator, the bytes of live torch tensors
        on the CPU, over one step after the first (the optimizer state exists).
    longest_seq_len: the longest multiple of 256 (up to max_seq_len) whose predicted peak fits (is within
        allocatable_bytes); None if not even 256 tokens fit.
    budget_bytes / budget_source: the budget, and where it came from ("argument", or what the device can take now).
    allocatable_bytes / allocator: the part of the budget a step's peak allocated can reach on this device's
        allocator, and why (the backend's allocatable fraction: a caching allocator keeps the rest as free blocks).
    method: "fake step + calibration", "fake step" (calibrate=False) or "extrapolated from real steps".
    calibration: the real step: seq_len, measured_bytes, tracked_bytes (the fake count at that length), offset_bytes
        (added to every prediction), measured_by, live_tensor_bytes, device_bytes.
    static_bytes: bytes of the tensors that exist before the step (weights, quantization statistics, the batch).
    peak_phase: {seq_len: "forward" | "backward" | "optimizer"}: where the peak falls (fake step only).
    predictions: every length predicted, the search for longest_seq_len included (for plots).
    device_bytes: what the forecast itself allocated on the device at its peak (the calibration step).
    """

    peak_bytes: dict[int, int]
    longest_seq_len: int | None
    budget_bytes: int
    budget_source: str
    allocatable_bytes: int
    allocator: str
    method: str
    device: str
    backend: str
    batch_size: int
    max_seq_len: int
    calibration: dict[str, Any] | None
    static_bytes: int | None
    peak_phase: dict[int, str]
    predictions: dict[int, int]
    fit: dict[str, float] | None
    device_bytes: int | None
    seconds: float
    notes: list[str]

    def fits(self, seq_len: int) -> bool | None:
        """Whether the predicted peak at a forecast length fits (is within allocatable_bytes; None: not forecast)."""
        peak = self.peak_bytes.get(seq_len)
        return None if peak is None else peak <= self.allocatable_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain types (int keys as ints), ready for JSON."""
        out = dataclasses.asdict(self)
        out["peak_bytes"] = {int(k): v for k, v in self.peak_bytes.items()}
        out["predictions"] = {int(k): v for k, v in self.predictions.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def summary(self) -> str:
        lines = [
            f"forecast on {self.device} ({self.method}), batch {self.batch_size}: "
            f"budget {human_bytes(self.budget_bytes)} ({self.budget_source}), of which a step can fill "
            f"{human_bytes(self.allocatable_bytes)} ({self.allocator})"
        ]
        lines.append(f"  {'seq_len':>8}  {'predicted peak':>15}  fits  peak in")
        for seq_len, peak in sorted(self.peak_bytes.items()):
            verdict = "yes" if self.fits(seq_len) else "no"
            lines.append(f"  {seq_len:>8}  {human_bytes(peak):>15}  {verdict:<4}  {self.peak_phase.get(seq_len, '')}")
        longest = "none (not even 256 tokens)" if self.longest_seq_len is None else str(self.longest_seq_len)
        lines.append(f"longest sequence that fits: {longest} (multiples of {SEQ_LEN_STEP}, up to {self.max_seq_len})")
        if self.calibration is not None:
            c = self.calibration
            lines.append(
                f"calibration: one real step at {c['seq_len']} tokens measured {human_bytes(c['measured_bytes'])}, "
                f"tensor accounting {human_bytes(c['tracked_bytes'])}: {c['offset_bytes'] / MiB:+.1f} MiB added "
                "to every prediction"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def forecast(
    model: nn.Module,
    seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
    batch_size: int = 1,
    budget_bytes: int | None = None,
    *,
    device: str | torch.device = "auto",
    calibrate: bool = True,
    method: str = "auto",
    max_seq_len: int | None = None,
) -> Forecast:
    """Predict the peak memory of one training step of `model` at each of `seq_lens` tokens (batch `batch_size`),
    and the longest length that fits `budget_bytes`, without running the step at those lengths.

    Call it on the model as it will be trained: after ``prepare()`` and ``get_peft_model()``, before creating the
    optimizer (the forecast counts an AdamW state of its own). The model is left exactly as it was.

    Args:
        model: a model with trainable parameters (a PeftModel, or any model whose adapters require grad).
        seq_lens: lengths to forecast (positive ints).
        batch_size: sequences per step.
        budget_bytes: the memory the step may use, in bytes (weights included). None: what the device can take now,
            the snapshot's headroom plus what is allocated already (on the CPU and unified memory, the host's
            available memory as prepare() measures it).
        device: "auto" (where the model is) or a device string.
        calibrate: run the one short real step that measures what tensor accounting misses (default). False: no
            device allocation at all; tensor accounting only.
        method: "auto" (fake step, else extrapolation), "fake" (fail rather than fall back) or "extrapolate" (real
            steps at three short lengths).
        max_seq_len: ceiling of the search for longest_seq_len; default: the config's max_position_embeddings.

    Raises:
        ValueError / TypeError: bad input (no trainable parameter, lengths or budget not positive ints ...), before
            anything runs.
    """
    lengths = check_request(model, seq_lens, batch_size, budget_bytes, method, max_seq_len, calibrate)
    started = time.perf_counter()
    target = _target_of(model, device)
    ceiling = max_seq_len or _max_positions(model) or DEFAULT_MAX_SEQ_LEN
    calibration_len = min(CALIBRATION_SEQ_LEN, *lengths)
    before = memory.take(target)
    notes: list[str] = []
    budget, budget_source = (budget_bytes, "argument") if budget_bytes is not None else _default_budget(before, model)
    fraction, allocator = target.backend.allocatable_fraction(target.device)
    allocatable = int(budget * fraction)
    token = token_for(model)
    with torch._C.DisableTorchFunctionSubclass():
        devices = sorted({str(p.device) for p in model.parameters()})
    if len(devices) > 1:
        notes.append(f"the model spans {', '.join(devices)}: only {target.device}'s tensors are counted")

    predictor = fake_steps(model, target, batch_size, token, calibration_len, method, notes)
    calibration: dict[str, Any] | None = None
    device_bytes: int | None = None
    fit: dict[str, float] | None = None
    if predictor is not None:
        if calibrate:
            calibration = calibrate_on_device(model, target, predictor, calibration_len, batch_size, token, notes)
        offset = calibration["offset_bytes"] if calibration is not None else 0
        device_bytes = calibration["device_bytes"] if calibration is not None else None
        method_name = "fake step + calibration" if calibration is not None else "fake step"
        static_bytes = predictor.static_bytes

        def predict(seq_len: int) -> int:
            assert predictor is not None
            return predictor.peak(seq_len) + offset

    else:
        fit, device_bytes, fit_notes = extrapolate(model, target, calibration_len, batch_size, token)
        notes += fit_notes
        method_name = "extrapolated from real steps"
        static_bytes = None

        def predict(seq_len: int) -> int:
            assert fit is not None
            return int(fit["a"] + fit["b"] * seq_len + fit["c"] * seq_len * seq_len)

    predictions: dict[int, int] = {}

    def remembered(seq_len: int) -> int:
        if seq_len not in predictions:
            predictions[seq_len] = predict(seq_len)
        return predictions[seq_len]

    peaks = {seq_len: remembered(seq_len) for seq_len in lengths}
    longest, searched = longest_fitting(remembered, allocatable, ceiling, peaks)
    if searched is not None:
        notes.append(searched)
    phases = predictor.phases() if isinstance(predictor, FakeSteps) else {}
    return Forecast(
        peak_bytes=peaks,
        longest_seq_len=longest,
        budget_bytes=budget,
        budget_source=budget_source,
        allocatable_bytes=allocatable,
        allocator=allocator,
        method=method_name,
        device=str(target.device),
        backend=target.backend.name,
        batch_size=batch_size,
        max_seq_len=ceiling,
        calibration=calibration,
        static_bytes=static_bytes,
        peak_phase={k: v for k, v in phases.items() if k in peaks},
        predictions=dict(sorted(predictions.items())),
        fit=fit,
        device_bytes=device_bytes,
        seconds=round(time.perf_counter() - started, 3),
        notes=notes,
    )


def fake_steps(
    model: nn.Module, target: Target, batch_size: int, token: int, first_len: int, method: str, notes: list[str]
) -> FakeSteps | None:
    """The fake-step predictor, tried once at `first_len`; None (with a note) where it cannot run and `method`
    allows falling back."""
    if method == "extrapolate":
        return None
    fake = FakeSteps(model, target.device, batch_size, token)
    try:
        fake.peak(first_len)
    except Exception as error:
        if method == "fake":
            raise
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        notes.append(f"the fake step could not run ({reason}); extrapolated from real steps instead")
        return None
    return fake


def calibrate_on_device(
    model: nn.Module,
    target: Target,
    predictor: FakeSteps,
    seq_len: int,
    batch_size: int,
    token: int,
    notes: list[str],
) -> dict[str, Any] | None:
    """One real step at `seq_len`: what it measured, what the fake step counted, and the difference (added to every
    prediction). None where it ran out of memory (noted: the predictions stay tensor accounting only)."""
    try:
        measured = measure_step(model, target, seq_len, batch_size, token)
    except torch.OutOfMemoryError:
        target.backend.release(target.device)
        notes.append(
            f"the calibration step ({seq_len} tokens) ran out of memory: the predictions are tensor accounting only, "
            "and not even the shortest step fits now"
        )
        return None
    notes += measured.notes
    tracked = predictor.peak(seq_len)
    return {
        "seq_len": seq_len,
        "measured_bytes": measured.peak_bytes,
        "tracked_bytes": tracked,
        "offset_bytes": measured.peak_bytes - tracked,
        "measured_by": measured.source,
        "live_tensor_bytes": measured.live_tensor_peak,
        "device_bytes": measured.device_bytes,
    }


# ---- checks (nothing runs before these pass) -------------------------------------------------------------------


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_request(
    model: Any,
    seq_lens: Any,
    batch_size: Any,
    budget_bytes: Any,
    method: Any,
    max_seq_len: Any,
    calibrate: Any,
) -> list[int]:
    """Every argument checked before anything runs; returns the lengths, sorted and deduplicated."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"forecast() takes the model as it will be trained (an nn.Module), not {type(model).__name__}")
    with torch._C.DisableTorchFunctionSubclass():  # quantized subclasses dispatch every attribute read otherwise
        trainable = any(p.requires_grad for p in model.parameters())
    if not trainable:
        raise ValueError(
            "the model has no trainable parameter: forecast() predicts a training step of the model as it will be "
            "trained. Call get_peft_model(model, LoraConfig(...)) first (after portable_kbit.prepare())."
        )
    if isinstance(seq_lens, (int, str)) or not isinstance(seq_lens, Sequence) or not seq_lens:
        raise ValueError(f"seq_lens={seq_lens!r} must be a non-empty sequence of positive ints, e.g. (512, 1024)")
    bad = [value for value in seq_lens if not _positive_int(value)]
    if bad:
        raise ValueError(f"seq_lens={tuple(seq_lens)!r}: {bad[0]!r} is not a positive int (tokens per sequence)")
    if not _positive_int(batch_size):
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if budget_bytes is not None and not _positive_int(budget_bytes):
        raise ValueError(
            f"budget_bytes={budget_bytes!r} must be a positive int of bytes (e.g. 8 << 30 for 8 GiB), or None for "
            "what the device can take now"
        )
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {', '.join(map(repr, METHODS))}")
    if max_seq_len is not None and not _positive_int(max_seq_len):
        raise ValueError(f"max_seq_len={max_seq_len!r} must be a positive int, or None for the config's maximum")
    if not isinstance(calibrate, bool):
        raise TypeError(f"calibrate must be True or False, not {calibrate!r}")
    if method == "extrapolate" and not calibrate:
        raise ValueError("method='extrapolate' measures real steps: it cannot run with calibrate=False")
    return sorted(set(seq_lens))


def _target_of(model: nn.Module, device: str | torch.device) -> Target:
    with torch._C.DisableTorchFunctionSubclass():
        first = next(model.parameters()).device
    target = backends.resolve(device, first)
    if target.device.type != first.type:
        raise ValueError(
            f"the model is on {first} but device={device!r}: forecast() predicts a step where the model is; pass "
            "device='auto' or move the model first"
        )
    return target


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(hf_model(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and _positive_int(value):
            return value
    return None


def _default_budget(before: memory.MemorySnapshot, model: nn.Module) -> tuple[int, str]:
    """What the device can take now: headroom (free memory, on unified memory the host's available memory, plus the
    allocator's unused cache) plus what is allocated already (the weights are part of the peak)."""
    if before.headroom is None:
        raise ValueError(
            f"the {before.backend} backend cannot say how much memory is free here: pass budget_bytes explicitly"
        )
    if before.allocated is not None:
        return before.headroom + before.allocated, "device headroom + allocated now"
    with torch._C.DisableTorchFunctionSubclass():
        resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return before.headroom + resident, "host available + the model's tensors now"


def token_for(model: nn.Module) -> int:
    """A token id that is not padding: the batch's values do not change memory, but a pad id would make
    transformers warn or take the padding path."""
    embeddings = input_embeddings(model)
    weight = getattr(embeddings, "weight", None)
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 2
    config = getattr(hf_model(model), "config", None)
    special = {getattr(config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return next((t for t in range(min(vocab, 8)) if t not in special), 0)


# ---- one training step, fake or real -----------------------------------------------------------------------------


@contextlib.contextmanager
def closing_checkpoints_on_error() -> Iterator[None]:
    """A step that raises inside a checkpointed layer must not leave checkpoint's saved-tensor hook behind.

    torch.utils.checkpoint (non-reentrant) pushes that hook in a generator, and up to torch 2.11 ``checkpoint()`` does
    not close the generator when the checkpointed function raises: the hook stays pushed until the garbage collector
    finds the generator, and every later forward in the process saves its tensors through a dead checkpoint ("A
    different number of tensors was saved during the original forward and recomputation"). Seen on the H100 image
    (torch 2.11) after a failed fake step; torch 2.13 closes it itself. The suspended generators are found in the
    traceback's frames and closed, innermost first, before the error goes on."""
    try:
        yield
    except BaseException as error:
        _close_suspended_checkpoints(error.__traceback__)
        raise


def _close_suspended_checkpoints(traceback: Any) -> None:
    import torch.utils.checkpoint as checkpoint_module

    code = getattr(getattr(checkpoint_module, "_checkpoint_without_reentrant_generator", None), "__code__", None)
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):
        for value in list(frame.f_locals.values()):
            if inspect.isgenerator(value) and value.gi_code is code and value.gi_frame is not None:
                value.close()


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Run a step on `model` and leave it as it was: training flags, every parameter's and buffer's tensor (an op under
    a fake mode must not leave a fake one behind), and the trainable parameters' gradients. Yields the trainable
    parameters, their gradients cleared for the step."""
    training = [(module, module.training) for module in model.modules()]
    slots = [
        (module, kind, dict(getattr(module, kind)))
        for module in model.modules()
        for kind in ("_parameters", "_buffers")
        if getattr(module, kind)
    ]
    with torch._C.DisableTorchFunctionSubclass():
        params = list(model.parameters())
        datas = [(p, p.data) for p in params]
        trainable = [p for p in params if p.requires_grad]
    grads = [(p, p.grad) for p in trainable]
    for p in trainable:
        p.grad = None
    try:
        yield trainable
    finally:
        for p, grad in grads:
            p.grad = grad
        for module, kind, saved in slots:
            current = getattr(module, kind)
            for name, tensor in saved.items():
                if current.get(name) is not tensor:
                    current[name] = tensor
        with torch._C.DisableTorchFunctionSubclass():
            for p, data in datas:
                if is_fake(p.data) or p.data.untyped_storage() is not data.untyped_storage():
                    p.data = data
        for module, flag in training:
            module.training = flag


def _adamw(params: Sequence[torch.Tensor], foreach: bool | None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=1e-4, foreach=foreach)


def _default_foreach(params: Sequence[torch.Tensor]) -> bool | None:
    """What AdamW picks by default for these (real) parameters: foreach on accelerators. The fake twins would not
    be recognised as such, so the choice is made on the real ones and passed explicitly."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(list(params), differentiable=False, use_fused=False)
        return bool(foreach)
    except Exception:  # private helper: None lets AdamW decide
        return None


def _forward_backward(model: nn.Module, ids: torch.Tensor, tracker: LiveTensorBytes) -> None:
    tracker.phase = "forward"
    with torch.enable_grad():  # a training step, even if the caller is under no_grad
        loss = model(input_ids=ids, labels=ids).loss
        tracker.phase = "backward"
        loss.backward()


def _optimizer_step(optimizer: torch.optim.Optimizer, tracker: LiveTensorBytes) -> None:
    tracker.phase = "optimizer"
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclasses.dataclass(frozen=True)
class LayerSample:
    """The decoder's repeated layers, and how many of them a fake step needs: the peak of a step is affine in the
    number of identical layers (each adds its weights, its saved input or activations, its adapters' gradients and
    optimizer state at the same rate), so steps with `period` and 2 x `period` layers give it for all of them."""

    parent: nn.Module
    name: str
    layers: nn.ModuleList
    period: int

    @property
    def count(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def first(self, k: int) -> Iterator[None]:
        """The model with only its first k layers for the duration of the block."""
        self.parent._modules[self.name] = nn.ModuleList(list(self.layers)[:k])
        try:
            yield
        finally:
            self.parent._modules[self.name] = self.layers


def _layer_signature(layer: nn.Module) -> tuple:
    with torch._C.DisableTorchFunctionSubclass():
        params = tuple(
            (name, type(p), tuple(p.shape), p.dtype, p.requires_grad) for name, p in layer.named_parameters()
        )
    return type(layer), params, tuple(type(m) for m in layer.modules())


def _period(config: Any, count: int) -> int:
    """The smallest repeat of the config's layer_types (sliding and full attention alternating), 1 without them."""
    types = list(getattr(config, "layer_types", None) or [])
    if len(types) != count:
        return 1
    for period in range(1, count + 1):
        if all(types[i] == types[i % period] for i in range(count)):
            return period
    return count


def repeated_layers(model: nn.Module) -> LayerSample | None:
    """The decoder's stack of identical layers (config.num_hidden_layers of them, same class, same parameter shapes
    and dtypes), if sampling it saves work; None otherwise (then the fake step runs every layer)."""
    base = hf_model(model)
    config = getattr(base, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not _positive_int(count):
        return None
    for qualified, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != count or not qualified:
            continue
        signatures = {_layer_signature(layer) for layer in module}
        period = _period(config, count)
        if len(signatures) != 1 or count <= 2 * period:
            return None
        parent_name, _, name = qualified.rpartition(".")
        return LayerSample(base.get_submodule(parent_name), name, module, period)
    return None


class FakeSteps:
    """Fake training steps of one model on one device, memoised per length: peak bytes of live tensors.

    With `sample_layers` (default) a stack of identical decoder layers runs with `period` and 2 x `period` of its
    layers and the peak is extrapolated to all of them (exact when the layers are identical; a 7B model's step
    costs a few layers' worth of Python instead of 32).
    """

    def __init__(
        self, model: nn.Module, device: torch.device, batch_size: int, token: int, sample_layers: bool = True
    ) -> None:
        self.model, self.device, self.batch_size, self.token = model, device, batch_size, token
        self.sample = repeated_layers(model) if sample_layers else None
        self._peaks: dict[int, tuple[int, str]] = {}
        self.static_bytes: int | None = None
        self.steps = 0

    def peak(self, seq_len: int) -> int:
        if seq_len not in self._peaks:
            self._peaks[seq_len] = self._extrapolated(seq_len)
        return self._peaks[seq_len][0]

    def phases(self) -> dict[int, str]:
        return {seq_len: phase for seq_len, (_, phase) in self._peaks.items()}

    def _extrapolated(self, seq_len: int) -> tuple[int, str]:
        sample = self.sample
        if sample is None:
            peak, static, phase = self._run(seq_len)
            self.static_bytes = static
            return peak, phase
        few, more = sample.period, 2 * sample.period
        with sample.first(few):
            peak_few, static_few, _ = self._run(seq_len)
        with sample.first(more):
            peak_more, static_more, phase = self._run(seq_len)
        scale = (sample.count - few) / (more - few)
        self.static_bytes = round(static_few + scale * (static_more - static_few))
        return round(peak_few + scale * (peak_more - peak_few)), phase

    def _run(self, seq_len: int) -> tuple[int, int, str]:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.steps += 1
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        tracker = LiveTensorBytes(self.device, fake_mode)
        model = self.model
        with (
            closing_checkpoints_on_error(),
            untouched(model) as trainable,
            transformers_sees_no_tracing(),
            parameter_subclasses_pass_fake_mode(),
        ):
            foreach = _default_foreach(trainable)
            set_training_flags(model.modules())  # transformers checkpoints activations only in training mode
            for tensor in [*model.parameters(), *model.buffers()]:
                tracker.adopt(tensor)
            with fake_mode, tracker:
                twins = [fake_mode.from_tensor(p) for p in trainable]
                optimizer = _adamw(twins, foreach)
                for twin in twins:  # the optimizer's state exists in every step after the first: make it now
                    twin.grad = torch.zeros_like(twin)
                _optimizer_step(optimizer, tracker)
                ids = torch.full((self.batch_size, seq_len), self.token, dtype=torch.long, device=self.device)
                tracker.phase = "forward"
                tracker.reset_peak()
                _forward_backward(model, ids, tracker)
                for p, twin in zip(trainable, twins, strict=True):  # the gradients reached the real leaves
                    twin.grad, p.grad = p.grad, None
                _optimizer_step(optimizer, tracker)
            return tracker.peak_bytes, tracker.static_bytes, tracker.peak_phase


@dataclasses.dataclass
class MeasuredStep:
    peak_bytes: int  # the allocator's peak allocated, or live tensor bytes where the device keeps no peak (CPU)
    source: str
    live_tensor_peak: int  # bytes of live tensors counted op by op (the same accounting as the fake step)
    device_bytes: int | None  # peak allocated minus allocated before (None: no allocator numbers)
    notes: list[str]


def measure_step(model: nn.Module, target: Target, seq_len: int, batch_size: int, token: int) -> MeasuredStep:
    """One real training step at `seq_len` after the optimizer state was made (the same protocol as the fake step),
    on the real model and device; the trainable parameters, their gradients and the RNG state are put back after.

    The peak: the allocator's peak allocated where the backend keeps one (CUDA, ROCm, MPS from torch 2.13), else the
    bytes of live torch tensors counted op by op (the CPU: that is what a forecast predicts there).
    """
    backend, device = target.backend, target.device
    notes: list[str] = []
    tracker = LiveTensorBytes(device)
    with closing_checkpoints_on_error(), untouched(model) as trainable, backend.preserved_rng(device):
        saved = [p.detach().to("cpu", copy=True) for p in trainable]  # host copies: no device memory
        set_training_flags(model.modules())
        try:
            backend.synchronize(device)
            before = backend.allocator_stats(device)
            for tensor in [*model.parameters(), *model.buffers()]:
                tracker.adopt(tensor)
            with tracker:
                optimizer = _adamw(trainable, None)
                for p in trainable:
                    p.grad = torch.zeros_like(p)
                _optimizer_step(optimizer, tracker)
                ids = torch.full((batch_size, seq_len), token, dtype=torch.long, device=device)
                backend.synchronize(device)
                backend.reset_peak(device)
                tracker.phase = "forward"
                tracker.reset_peak()
                _forward_backward(model, ids, tracker)
                _optimizer_step(optimizer, tracker)
            backend.synchronize(device)
            after = backend.allocator_stats(device)
            del optimizer, ids
        finally:
            with torch.no_grad():
                for p, copy in zip(trainable, saved, strict=True):
                    p.copy_(copy)
    if after.peak_allocated is not None:
        device_bytes = None if before.allocated is None else after.peak_allocated - before.allocated
        return MeasuredStep(after.peak_allocated, "allocator peak allocated", tracker.peak_bytes, device_bytes, notes)
    if device.type != "cpu":
        notes.append(
            f"{backend.name} keeps no allocator peak here: calibrated with live tensor bytes (driver memory not seen)"
        )
    return MeasuredStep(tracker.peak_bytes, "live tensor bytes", tracker.peak_bytes, None, notes)


# ---- the fallback: real steps at short lengths, extrapolated --------------------------------------------------------


def extrapolate(
    model: nn.Module, target: Target, shortest: int, batch_size: int, token: int
) -> tuple[dict[str, float], int | None, list[str]]:
    """peak(L) = a + bL + cL^2 through real steps at shortest, 1.5x and 2x (c >= 0; a least-squares line where the
    curvature comes out negative)."""
    lengths = sorted({shortest, max(shortest + 1, (3 * shortest) // 2), 2 * shortest})
    measured = [measure_step(model, target, length, batch_size, token) for length in lengths]
    xs = [float(length) for length in lengths]
    ys = [float(m.peak_bytes) for m in measured]
    a, b, c = _quadratic(xs, ys)
    if c < 0:
        a, b, c = (*_line(xs, ys), 0.0)
    device_bytes = max((m.device_bytes for m in measured if m.device_bytes is not None), default=None)
    notes = [f"real steps at {', '.join(map(str, lengths))} tokens: {', '.join(f'{y / MiB:.0f}' for y in ys)} MiB"]
    for m in measured:
        notes += [n for n in m.notes if n not in notes]
    return {"a": a, "b": b, "c": c}, device_bytes, notes


def _quadratic(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d01 = (y1 - y0) / (x1 - x0)
    d12 = (y2 - y1) / (x2 - x1)
    c = (d12 - d01) / (x2 - x0)
    b = d01 - c * (x0 + x1)
    return y0 - b * x0 - c * x0 * x0, b, c


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


# ---- the longest length that fits -----------------------------------------------------------------------------------


def longest_fitting(
    predict: Callable[[int], int], budget: int, ceiling: int, known: dict[int, int]
) -> tuple[int | None, str | None]:
    """The longest multiple of SEQ_LEN_STEP up to `ceiling` whose prediction fits `budget` (peaks grow with length).

    Known predictions bracket it first; then a false-position search (interpolating between the bracket's ends,
    Illinois-style, with bisection when it stalls) takes a few more predictions. Returns (length, note or None).
    """
    top = max(1, ceiling // SEQ_LEN_STEP)
    values: dict[int, int] = {}
    for seq_len, peak in known.items():
        if seq_len % SEQ_LEN_STEP == 0 and seq_len <= top * SEQ_LEN_STEP:
            values[seq_len // SEQ_LEN_STEP] = peak
    evaluations = 0

    def value(k: int) -> int:
        nonlocal evaluations
        if k not in values:
            evaluations += 1
            values[k] = predict(k * SEQ_LEN_STEP)
        return values[k]

    fitting = [k for k, v in values.items() if v <= budget]
    failing = [k for k, v in values.items() if v > budget]
    lo = max(fitting, default=0)
    hi = min((k for k in failing if k > lo), default=None)
    if hi is None:
        if value(top) <= budget:
            return top * SEQ_LEN_STEP, None
        hi = top
    if lo == 0 and value(1) > budget:
        return None, None
    lo = max(lo, 1)
    while hi - lo > 1:
        if evaluations >= MAX_SEARCH_STEPS:
            return lo * SEQ_LEN_STEP, (
                f"longest_seq_len: search stopped after {evaluations} predictions; the answer lies between "
                f"{lo * SEQ_LEN_STEP} (fits) and {hi * SEQ_LEN_STEP} (does not)"
            )
        below, above = budget - value(lo), value(hi) - budget  # below >= 0, above > 0
        k = min(hi - 1, max(lo + 1, math.floor(lo + (hi - lo) * below / (below + above))))
        if value(k) <= budget:  # the crossing is above k: is it right there?
            lo = k
            if hi - lo > 1 and value(k + 1) > budget:
                hi = k + 1
        else:
            hi = k
            if hi - lo > 1 and value(k - 1) <= budget:
                lo = k - 1
    return lo * SEQ_LEN_STEP, None


__all__ = ["DEFAULT_SEQ_LENS", "Forecast", "MeasuredStep", "forecast", "measure_step", "token_for"]
