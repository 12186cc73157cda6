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

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import backends
from ..backends import Target
from ..constants import MiB
from ..model.hf import hf_model, input_embeddings
from . import snapshots
from .longest import MAX_SEARCH_STEPS, SEQ_LEN_STEP, longest_fitting
from .snapshots import human_bytes
from .steps import FakeSteps, MeasuredStep, measure_step

DEFAULT_SEQ_LENS = (512, 1024, 2048, 4096)
#: the calibration step's length (or the shortest length asked for, if shorter)
CALIBRATION_SEQ_LEN = 256
#: the search ceiling where the config names no maximum position
DEFAULT_MAX_SEQ_LEN = 32768
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
    ceiling = max_seq_len or max_positions(model) or DEFAULT_MAX_SEQ_LEN
    calibration_len = min(CALIBRATION_SEQ_LEN, *lengths)
    before = snapshots.take(target)
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


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (max_position_embeddings, n_positions or max_sequence_length);
    None where it names none. forecast() searches longest_seq_len up to it."""
    config = getattr(hf_model(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and _positive_int(value):
            return value
    return None


def _default_budget(before: snapshots.MemorySnapshot, model: nn.Module) -> tuple[int, str]:
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


__all__ = [
    "DEFAULT_MAX_SEQ_LEN",
    "DEFAULT_SEQ_LENS",
    "MAX_SEARCH_STEPS",
    "Forecast",
    "MeasuredStep",
    "forecast",
    "longest_fitting",
    "max_positions",
    "measure_step",
    "token_for",
]
