"""The one trace of a model's forward: run once on shape-only stand-ins, it records what prepare() needs and leaves
the model exactly as it found it.

What it records (``Trace``):

- ``feeding``: for each adapted module (by layer pattern), the pattern of the norm whose output is its input: the
  plan's adjacent norms;
- ``head``, ``transform``, ``head_problem``: the output head a forward with labels called, what the model did to its
  logits before the loss (a ``LogitTransform``), or why the head and loss cannot run in token blocks;
- ``mlps``: the position-wise MLPs, found by behaviour: a module with children that takes a norm's output alone and
  returns a tensor of its shape (token blocks).

How: every weight-holding leaf (and peft's adapter wrappers) gets a stand-in forward that returns an empty meta
tensor of the right shape, the inputs are meta tensors, and the model's loss function is a stand-in that ends the
forward: no kernel runs and no memory is taken (a real first forward would initialise cuBLAS: +32 MiB and seconds on
a fresh CUDA process). The decoder stack keeps one layer of each kind. Where an architecture's forward cannot run
that way, a ladder of fallbacks follows: without a ready 4-D mask, every layer, and last a real two-token forward
without grad. Each rung starts from a snapshot of the model (``ModelState``) and puts it back, whatever the forward
set on the way (CTRL caches a meta copy of its position table, BigBird switches its attention type).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .hf import hf_model, input_embeddings, output_embeddings, set_training_flags, weight_of
from .layers import decoder_layers, layer_pattern
from .logit_transform import LogitTransform, TransformRecorder
from .norms import is_norm
from .state import ModelState

#: the ladder: (inputs, one decoder layer of each kind), first that runs wins
RUNGS: tuple[tuple[str, bool], ...] = (
    ("meta with a 4-D mask", True),
    ("meta", True),
    ("meta with a 4-D mask", False),
    ("meta", False),
    ("real", True),
    ("real", False),
)
#: what a rung that cannot run raises (anything else is a bug and propagates)
CANNOT_RUN = (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError, IndexError, KeyError)

_tracing: contextvars.ContextVar[bool] = contextvars.ContextVar("portable_kbit_tracing", default=False)


def is_tracing() -> bool:
    """True inside the trace's forward: what prepare() installed earlier runs as if it were not there."""
    return _tracing.get()


@dataclasses.dataclass
class MlpCandidate:
    """A module the trace saw take a norm's output alone; ``reason``: why it cannot run in blocks (None: it can)."""

    module: nn.Module
    shape: tuple[int, ...]
    version: int
    reason: str | None = None
    kind: str = "tensor"  # "tensor", or "tuple" (a tensor of the input's shape first, then per-token tensors)
    mutates_input: bool = False  # an in-place op on its input (Mixtral's router jitter): each block gets a copy
    records: bool = False  # transformers records outputs of a submodule (a router); set by token blocks' planning


@dataclasses.dataclass
class Trace:
    """What the trace found; ``error`` says why no rung ran (then nothing else was recorded)."""

    feeding: dict[str, str | None] = dataclasses.field(default_factory=dict)
    head: nn.Module | None = None
    transform: LogitTransform | None = None
    head_problem: str | None = None
    mlps: dict[nn.Module, MlpCandidate] = dataclasses.field(default_factory=dict)
    rung: str | None = None
    error: str | None = None
    seconds: float = 0.0


class _TraceDone(Exception):
    """Raised by the stand-in loss function: the rest of the forward does not matter."""


class _CannotTraceOnMeta(RuntimeError):
    """A weight-holding module without a shape rule (MoE experts hold 3-D weights): the real forward must run."""


def trace(model: nn.Module, adapted: Sequence[str] = ()) -> Trace:
    """Trace `model`'s forward (a PeftModel's base model runs); `adapted` names the modules adapters are (or will be)
    on, as ``model.named_modules()`` names them. Never raises for a forward that cannot run: ``Trace.error`` says
    why."""
    started = time.perf_counter()
    errors = []
    for inputs, one_layer_each in RUNGS:
        try:
            result = _run(model, adapted, inputs, one_layer_each)
        except CANNOT_RUN as error:
            errors.append(f"{inputs}: {type(error).__name__}: {str(error)[:200]}")
            continue
        result.rung = f"{inputs}, {'one decoder layer of each kind' if one_layer_each else 'every layer'}"
        result.seconds = time.perf_counter() - started
        return result
    return Trace(error="; ".join(errors[-2:]), seconds=time.perf_counter() - started)


def _run(model: nn.Module, adapted: Sequence[str], inputs_kind: str, one_layer_each: bool) -> Trace:
    runner = hf_model(model)
    recorder = _Recorder(runner, {layer_pattern(name) for name in adapted})
    state = ModelState(model)
    token = _tracing.set(True)
    try:
        with contextlib.ExitStack() as reduced:
            stack = decoder_layers(runner) if one_layer_each else None
            if stack is not None:
                reduced.enter_context(stack.only(stack.first_of_each_kind()))
            named = dict(model.named_modules())  # what the forward will meet (one layer of each kind)
            if inputs_kind != "real":
                _install_stand_ins(named.values())
            recorder.install(named)
            set_training_flags(named.values())  # bitsandbytes repacks CPU weights on an eval-mode forward
            with torch.no_grad(), recorder.recording():
                try:
                    runner(**_inputs(runner, inputs_kind), use_cache=False)
                except _TraceDone:
                    pass
    finally:
        _tracing.reset(token)
        state.restore()
    return recorder.result()


def _shape_only_forward(module: nn.Module) -> Callable[..., torch.Tensor] | None:
    """A stand-in forward that returns an empty meta tensor of the right shape, or None if we cannot tell the shape."""
    weight = getattr(module, "weight", None)
    float_dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point else None
    embedding_dim = getattr(module, "embedding_dim", None)
    if isinstance(embedding_dim, int):
        dtype = float_dtype or torch.float32
        return lambda ids, *args, **kwargs: torch.empty(*ids.shape, embedding_dim, device="meta", dtype=dtype)
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)  # Linear-likes, Conv1D
    if isinstance(width, int):
        return lambda x, *args, **kwargs: torch.empty(*x.shape[:-1], width, device="meta", dtype=x.dtype)
    if is_norm(module):
        return lambda x, *args, **kwargs: torch.empty_like(x, device="meta")
    return None


def _install_stand_ins(modules: Any) -> None:
    """A shape-only forward for every weight-holding leaf and peft adapter wrapper (put back by the snapshot)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in modules:
        is_leaf_with_weights = not module._modules and any(p is not None for p in module._parameters.values())
        if not (is_leaf_with_weights or isinstance(module, BaseTunerLayer)):
            continue
        stand_in = _shape_only_forward(module)
        if stand_in is None:
            raise _CannotTraceOnMeta(f"no shape rule for {type(module).__name__}")
        module.__dict__["forward"] = stand_in


def _inputs(model: nn.Module, inputs_kind: str) -> dict[str, torch.Tensor]:
    """Two tokens (with labels where the forward takes them): meta tensors, or real ones on the weights' device."""
    if inputs_kind == "real":
        embeddings = input_embeddings(model)
        if embeddings is None:
            raise ValueError("the model has no input embeddings: no token ids to trace with")
        weight = weight_of(embeddings)
        ids = torch.tensor([[1, 2]], dtype=torch.long, device=weight.device).clamp(max=weight.shape[0] - 1)
        inputs = {"input_ids": ids}
    else:
        inputs = {"input_ids": torch.zeros((1, 2), dtype=torch.long, device="meta")}
        if inputs_kind == "meta with a 4-D mask":
            # Some mask builders inspect values (impossible on meta); a ready 4-D mask is passed through instead.
            # Built on the CPU and moved: a first tril on meta runs a Python meta kernel (2 ms).
            inputs["attention_mask"] = torch.ones((1, 1, 2, 2), dtype=torch.bool).tril().to("meta")
    if _takes_labels(model):
        inputs["labels"] = inputs["input_ids"]
    return inputs


def _takes_labels(model: nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "labels" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class _Recorder:
    """The hooks of one rung and what they saw."""

    def __init__(self, runner: nn.Module, wanted: set[str]) -> None:
        self.runner = runner
        self.wanted = wanted  # adapted module patterns
        self.trace = Trace()
        self.head = output_embeddings(runner)
        self.norm_outputs: dict[int, str] = {}  # id of a norm's output -> the norm's name
        self.alive: list[torch.Tensor] = []  # so that no id is reused within the trace
        self.active: list[MlpCandidate] = []
        self.claimed: set[int] = set()
        self.modes: list[TransformRecorder] = []
        self.single_layers: set[nn.Module] = set()

    # ---- installed on the (reduced) model ----------------------------------------------------------------------

    def install(self, named: dict[str, nn.Module]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        norms = {module for name, module in named.items() if name and is_norm(module)}
        # an adapter's wrapper (peft's LoRA Linear) has children but is one layer, never a position-wise MLP
        self.single_layers = {module for module in named.values() if isinstance(module, BaseTunerLayer)}
        for name, module in named.items():
            if module in norms:
                module.register_forward_hook(self._on_norm(name))
            elif name and layer_pattern(name) in self.wanted:
                # prepend: see the input before the hooks of an earlier prepare() replace it with a cast copy
                module.register_forward_pre_hook(self._on_adapted(name), with_kwargs=True, prepend=True)
            if module is self.runner or module in norms:
                continue
            module.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True)
            if module._modules:
                module.register_forward_hook(self._after, with_kwargs=True)
        if self.head is not None:
            self.head.register_forward_hook(self._on_head)
        self.runner.__dict__["_loss_function"] = self._loss_stand_in

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        try:
            yield
        finally:
            while self.modes:
                self.modes.pop().__exit__(None, None, None)

    def _produced_by(self, tensor: Any) -> str | None:
        while isinstance(tensor, torch.Tensor):
            if id(tensor) in self.norm_outputs:
                return self.norm_outputs[id(tensor)]
            tensor = tensor._base  # a view of a norm's output still comes from that norm
        return None

    def _on_norm(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, torch.Tensor):
                self.norm_outputs[id(tensor)] = name
                self.alive.append(tensor)

        return hook

    def _on_adapted(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            pattern = layer_pattern(name)
            if pattern in self.trace.feeding:
                return
            tensor = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            norm = self._produced_by(tensor)
            self.trace.feeding[pattern] = layer_pattern(norm) if norm is not None else None

        return hook

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs:
            for candidate in self.active:  # a sub-call with keyword arguments (masks, positions): not position-wise
                candidate.reason = candidate.reason or (
                    f"calls {type(module).__name__} with keyword arguments (not position-wise)"
                )
        if (
            module._modules
            and module not in self.single_layers
            and len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)
            and args[0].dim() >= 2
            and id(args[0]) not in self.claimed
            and self._produced_by(args[0]) is not None
        ):
            self.claimed.add(id(args[0]))
            self.alive.append(args[0])
            candidate = MlpCandidate(module, tuple(args[0].shape), args[0]._version)
            self.active.append(candidate)
            self.trace.mlps[module] = candidate

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.active or self.active[-1].module is not module:
            return
        candidate = self.active.pop()
        tokens = 1
        for size in candidate.shape[:-1]:
            tokens *= size
        candidate.mutates_input = args[0]._version != candidate.version
        if isinstance(output, torch.Tensor):
            if tuple(output.shape) != candidate.shape:
                candidate.reason = f"returns shape {tuple(output.shape)} for an input of shape {candidate.shape}"
            return
        if (
            isinstance(output, tuple)
            and output
            and isinstance(output[0], torch.Tensor)
            and tuple(output[0].shape) == candidate.shape
            and all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == tokens for t in output[1:])
        ):
            candidate.kind = "tuple"
            return
        candidate.reason = f"returns {type(output).__name__}, not a tensor of its input's shape"

    def _on_head(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.modes or not isinstance(output, torch.Tensor):
            return
        self.trace.head = module
        mode = TransformRecorder(output)
        mode.__enter__()
        self.modes.append(mode)

    def _loss_stand_in(self, *args: Any, **kwargs: Any) -> Any:
        logits = kwargs.get("logits", args[0] if args else None)
        if self.modes:
            mode = self.modes.pop()
            mode.__exit__(None, None, None)
            if isinstance(logits, torch.Tensor) and id(logits) in mode.index:
                self.trace.transform = LogitTransform(mode.nodes, mode.index[id(logits)])
            else:
                self.trace.head_problem = "the model's loss is not computed from its output head's logits"
        raise _TraceDone

    # ---- the record -------------------------------------------------------------------------------------------

    def result(self) -> Trace:
        found = self.trace
        if found.head is None:
            found.head_problem = "the forward with labels never called the output head"
        elif found.transform is None and found.head_problem is None:
            found.head_problem = "the forward with labels never called the model's loss_function"
        elif found.transform is not None and found.transform.opaque:
            found.head_problem = (
                f"the model transforms its logits before the loss with {', '.join(found.transform.opaque)}, "
                "which is not elementwise and cannot be replayed on blocks of tokens"
            )
        return found
