"""One training step of the model as it will be trained, fake (under FakeTensorMode: no data, its peak bytes counted
op by op) or real (the allocator's peak): forward with labels, backward, an AdamW step; the model left as it was.

The fake steps run a sample of the decoder layers where they are identical: a step's peak is affine in the number of
identical layers (each adds its weights, its saved input or activations, its adapters' gradients and optimizer state
at the same rate), so steps with a few periods of layers give it for all of them, once the growth per period has
settled (FIRST_PERIODS, SETTLED).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..backends import Target
from ..model.hf import hf_model, set_training_flags
from ..model.layers import DecoderLayers, decoder_layers
from .livebytes import LiveTensorBytes, is_fake, parameter_subclasses_pass_fake_mode, transformers_sees_no_tracing


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


def _layer_signature(layer: nn.Module) -> tuple:
    with torch._C.DisableTorchFunctionSubclass():
        params = tuple(
            (name, type(p), tuple(p.shape), p.dtype, p.requires_grad) for name, p in layer.named_parameters()
        )
    return type(layer), params, tuple(type(m) for m in layer.modules())


#: the fake step runs 2, 3, ... periods of a layer stack and extrapolates from the last two, once the per-layer growth
#: has settled: what a step holds a fixed number of times (offload's in-flight and prefetched layer inputs) is in
#: every sample only from some count on. Sampling 1 and 2 read offload's prefetch as a per-layer cost (run 10 on the
#: H100); 2 and 3 were still short of native mode's window (run 11: 1.45x its measured peak at 21,848 tokens)
FIRST_PERIODS = 2
MAX_PERIODS = 6
#: growths per layer that differ by less than this (relative) have settled
SETTLED = 0.005


def repeated_layers(model: nn.Module) -> tuple[DecoderLayers, int] | None:
    """The decoder layers and their period (config.layer_types' repeat), where they are config.num_hidden_layers
    identical layers (same class, same parameter shapes and dtypes) and sampling them saves work; None otherwise
    (then a fake step runs every layer)."""
    base = hf_model(model)
    config = getattr(base, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    stack = decoder_layers(base)
    if stack is None or not isinstance(count, int) or len(stack) != count:
        return None
    if len(stack.first_of_each_kind(_layer_signature)) != 1:
        return None
    period = stack.period(config)
    return (stack, period) if count > (FIRST_PERIODS + 1) * period else None


class FakeSteps:
    """Fake training steps of one model on one device, memoised per length: peak bytes of live tensors.

    With `sample_layers` (default) a stack of identical decoder layers runs with 2, 3, ... x `period` of its layers
    until the peak's growth per period has settled (at most MAX_PERIODS), and the peak is extrapolated from the last
    two to all of them (exact when the layers are identical; a 7B model's step costs a few layers' worth of Python
    instead of 32).
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
        stack, period = sample
        runs: dict[int, tuple[int, int]] = {}  # layers run -> (peak, static)
        growth: float | None = None
        layers = FIRST_PERIODS * period
        while True:
            with stack.only(list(stack.layers)[:layers]):
                peak, static, phase = self._run(seq_len)
            runs[layers] = (peak, static)
            before = runs.get(layers - period)
            if before is not None:
                last, growth = growth, (peak - before[0]) / period
                settled = last is not None and abs(growth - last) <= SETTLED * max(abs(last), 1.0)
                if settled or layers + period > min(len(stack), MAX_PERIODS * period):
                    break
            layers += period
        few, more = layers - period, layers
        scale = (len(stack) - few) / (more - few)
        (peak_few, static_few), (peak_more, static_more) = runs[few], runs[more]
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
