"""Token blocks for long sequences: the output head with the loss, and each decoder layer's position-wise MLP, run
block by block over tokens with recompute in backward, so that the ``[tokens, vocab]`` logits and the
``[tokens, intermediate]`` MLP temporaries never exist at full length.

Everything goes through transformers' extension points, for every architecture alike:

- the head and the loss: a forward pre-hook on the model sees ``labels`` (training mode); a one-shot pre-hook on the
  output head it then finds (``get_output_embeddings()``, looked up on each call, so that a peft wrapper added after
  prepare() is the one hooked) keeps the hidden states and lets the head run on zero tokens; the model's settable
  ``loss_function`` computes transformers' causal-LM loss from the kept hidden states, one checkpointed block at a
  time, through the head module itself (so the head's numerics follow ``activations`` and its adapters train); a
  forward hook then sets ``outputs.logits`` to None, as Liger's ``skip_logits`` does.
- whatever the model does to the logits between the head and the loss (Gemma's soft-capping, Cohere's
  ``logit_scale``, Granite's ``logits_scaling``, and any other elementwise transform) is recorded once by a trace on
  the meta device and replayed on each block. A transform that is not elementwise cannot be replayed: prepare()
  refuses an explicit block size for such a model, and ``"auto"`` leaves its head alone.
- the MLPs: found by behaviour in the same trace (the module that consumes a norm's output, is called with that one
  tensor and nothing else, and returns a tensor of the same shape), then given an instance forward that runs it on
  blocks of tokens, each under non-reentrant checkpointing (nested inside transformers' own layer checkpointing).
  MoE blocks whose router outputs transformers records (for the auxiliary loss) are blocked where the recorded
  entries can be merged back into one per layer (transformers 5's output collector); elsewhere they are left alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import checkpoint

from ..model.hf import hf_model, loss_function, output_embeddings, set_training_flags
from ..model.index import ModelIndex
from ..pipeline import plan
from .dtype_flow import AttributeOverride, ForwardOverride

AUTO = "auto"
IGNORE_INDEX = -100
# labelled rows below this fraction of all rows: the loss scores only the labelled ones (padding, prompt tokens)
COMPACT_BELOW = 7 / 8

_tracing: contextvars.ContextVar[bool] = contextvars.ContextVar("portable_kbit_blocks_tracing", default=False)


# ---- the option -----------------------------------------------------------------------------------------------------


def check_option(value: Any) -> None:
    """``token_blocks`` must be None, "auto" or a positive int (tokens per block); ValueError otherwise."""
    if value is None or (isinstance(value, str) and value == AUTO):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"token_blocks={value!r} is not valid: use 'auto' (the backend's block size, only where a call is longer "
            "than one block), a positive int (tokens per block) or None (no token blocks)"
        )


# ---- the logit transform between head and loss: recorded once, replayed per block -----------------------------------

_ELEMENTWISE = {
    "__add__": "__add__",
    "__radd__": "__radd__",
    "__iadd__": "__add__",
    "__sub__": "__sub__",
    "__rsub__": "__rsub__",
    "__isub__": "__sub__",
    "__mul__": "__mul__",
    "__rmul__": "__rmul__",
    "__imul__": "__mul__",
    "__truediv__": "__truediv__",
    "__rtruediv__": "__rtruediv__",
    "__itruediv__": "__truediv__",
    "__neg__": "__neg__",
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "sub_": "sub",
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
    "div_": "div",
    "true_divide": "true_divide",
    "true_divide_": "true_divide",
    "neg": "neg",
    "neg_": "neg",
    "tanh": "tanh",
    "tanh_": "tanh",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "clamp": "clamp",
    "clamp_": "clamp",
    "clip": "clamp",
}
_CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
_IDENTITY = {"contiguous", "clone", "detach_", "requires_grad_"}


@dataclasses.dataclass(frozen=True)
class _Ref:
    node: int  # 0: the head's output; i > 0: the output of node i


@dataclasses.dataclass
class _Node:
    name: str  # what the report shows
    replay: Callable[..., torch.Tensor] | None  # None: not replayable (opaque)
    args: tuple
    kwargs: dict
    inputs: tuple[int, ...]


class LogitTransform:
    """The elementwise ops a model applies to the head's output before its loss, as recorded by a trace."""

    def __init__(self, nodes: list[_Node], output: int) -> None:
        self.nodes = nodes
        self.output = output
        needed: set[int] = set()
        pending = [output]
        while pending:
            index = pending.pop()
            if index == 0 or index in needed:
                continue
            needed.add(index)
            pending.extend(nodes[index - 1].inputs)
        self.needed = sorted(needed)

    @property
    def opaque(self) -> list[str]:
        return [self.nodes[i - 1].name for i in self.needed if self.nodes[i - 1].replay is None]

    def describe(self) -> list[str]:
        return [self.nodes[i - 1].name for i in self.needed]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        values = {0: logits}

        def value(item: Any) -> Any:
            return values[item.node] if isinstance(item, _Ref) else item

        for index in self.needed:
            node = self.nodes[index - 1]
            assert node.replay is not None  # refused at prepare() otherwise
            values[index] = node.replay(*tree_map(value, node.args), **tree_map(value, node.kwargs))
        return values[self.output]


class _TransformRecorder(TorchFunctionMode):
    """Records every torch call that takes the head's output, or something computed from it, as an input."""

    def __init__(self, head_output: torch.Tensor) -> None:
        super().__init__()
        self.index = {id(head_output): 0}
        self.alive = [head_output]  # no id is reused while recording
        self.nodes: list[_Node] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        inputs = tuple(self.index[id(t)] for t in leaves if isinstance(t, torch.Tensor) and id(t) in self.index)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not inputs or not outputs:
            return out  # metadata (shape, dtype) or unrelated work
        name = getattr(func, "__name__", repr(func))
        replay = self._replay(name, func, args, kwargs, out)
        node = _Node(name, replay, *self._template(args, kwargs), inputs)
        self.nodes.append(node)
        for tensor in outputs:
            self.index[id(tensor)] = len(self.nodes)
            self.alive.append(tensor)
        return out

    def _template(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def constant(item: Any) -> Any:
            if not isinstance(item, torch.Tensor):
                return item
            if id(item) in self.index:
                return _Ref(self.index[id(item)])
            return item

        return tree_map(constant, args), tree_map(constant, kwargs)

    def _replay(self, name: str, func: Any, args: tuple, kwargs: dict, out: Any) -> Callable | None:
        if not isinstance(out, torch.Tensor):
            return None
        leaves, _ = tree_flatten((args, kwargs))
        for leaf in leaves:  # other tensors: only parameters (kept by reference) or one-element real constants
            if isinstance(leaf, torch.Tensor) and id(leaf) not in self.index:
                if isinstance(leaf, nn.Parameter):
                    continue
                if leaf.device.type == "meta" or leaf.numel() != 1:
                    return None
        if name in _ELEMENTWISE:
            target = _ELEMENTWISE[name]
            method = getattr(torch.Tensor, target, None)
            if name == target and not name.startswith("__") and getattr(torch, name, None) is func:
                return func  # torch.mul(a, b) and the like: the same call
            return _scalars(method) if method is not None else None
        if name in _CASTS:
            dtype = _CASTS[name]
            return lambda x, *rest, **kw: x.to(dtype)
        if name in ("to", "type_as", "type"):
            dtype = out.dtype
            return lambda x, *rest, **kw: x.to(dtype)
        if name in _IDENTITY:
            return lambda x, *rest, **kw: x
        return None


def _scalars(method: Callable) -> Callable:
    """A replay that passes one-element constant tensors as Python numbers (they may live on another device)."""

    def replay(*args: Any, **kwargs: Any) -> Any:
        def number(item: Any) -> Any:
            if isinstance(item, torch.Tensor) and not isinstance(item, nn.Parameter) and item.numel() == 1:
                return item.item()
            return item

        return method(*tree_map(number, args), **tree_map(number, kwargs))

    return replay


# ---- the trace: what the head's output goes through, and which modules are position-wise MLPs -----------------------


class _TraceDone(Exception):
    """Raised by the stand-in loss function: the rest of the forward does not matter."""


@dataclasses.dataclass
class _Candidate:
    module: nn.Module
    shape: tuple[int, ...]
    version: int
    reason: str | None = None  # why it cannot be blocked (None: it can)
    kind: str = "tensor"  # "tensor" or "tuple" (a tensor of the input's shape first, then per-token tensors)
    mutates_input: bool = False  # an in-place op on its input (Mixtral's router jitter): each block gets a copy
    records: bool = False  # transformers records outputs of a submodule (a router): merged back after the blocks


@dataclasses.dataclass
class Trace:
    """What the trace found. head: the output head's module, None if the forward never reached it with labels."""

    head: nn.Module | None = None
    transform: LogitTransform | None = None
    head_problem: str | None = None  # why the head and loss cannot be blocked (None: they can)
    mlps: dict[nn.Module, _Candidate] = dataclasses.field(default_factory=dict)
    error: str | None = None  # the trace failed altogether


def trace(model: nn.Module) -> Trace:
    """Run the model's forward with labels on two tokens, on the meta device where it can (stand-ins for every
    weight-holding layer, one decoder layer of each kind), else for real; record what it does."""
    errors = []
    for inputs_kind, one_layer_each in (
        ("meta with a 4-D mask", True),
        ("meta", True),
        ("meta with a 4-D mask", False),
        ("meta", False),
        ("real", True),
        ("real", False),
    ):
        try:
            return _trace(model, inputs_kind, one_layer_each)
        except (
            plan._CannotTraceOnMeta,
            RuntimeError,
            NotImplementedError,
            TypeError,
            ValueError,
            AttributeError,
            IndexError,
            KeyError,
        ) as error:
            errors.append(f"{inputs_kind}: {type(error).__name__}: {str(error)[:200]}")
    return Trace(error="; ".join(errors[-2:]))


@contextlib.contextmanager
def _one_layer_of_each_kind(model: nn.Module, enabled: bool) -> Iterator[None]:
    """The longest ModuleList (the decoder layers) keeps its first layer of each structure, for the trace only."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not enabled or not lists:
        yield
        return
    layers = max(lists, key=len)
    original = layers.__dict__["_modules"]
    kept: OrderedDict[str, nn.Module | None] = OrderedDict()
    seen = set()
    for layer in original.values():
        signature = _signature(layer)
        if signature not in seen:
            seen.add(signature)
            kept[str(len(kept))] = layer
    layers.__dict__["_modules"] = kept
    try:
        yield
    finally:
        layers.__dict__["_modules"] = original


def _signature(module: nn.Module | None) -> tuple:
    if module is None:
        return ()
    return tuple((name, type(m).__name__) for name, m in module.named_modules())


@contextlib.contextmanager
def _shape_only_layers(model: nn.Module, enabled: bool) -> Iterator[None]:
    """plan's shape-only stand-ins for weight-holding layers; what was in each instance forward is put back."""
    if not enabled:
        yield
        return
    with plan.shape_only_stand_ins(ModelIndex(model).modules):
        yield


def _trace(model: nn.Module, inputs_kind: str, one_layer_each: bool) -> Trace:
    result = Trace()
    head = output_embeddings(model)
    norm_modules = {model.get_submodule(n): n for n in plan.norm_names(model)}
    norm_outputs: dict[int, nn.Module] = {}
    alive: list[torch.Tensor] = []
    active: list[_Candidate] = []
    claimed: set[int] = set()
    recorder: list[_TransformRecorder] = []
    handles = []
    meta = inputs_kind != "real"

    def produced_by_norm(tensor: Any) -> bool:
        while isinstance(tensor, torch.Tensor):
            if id(tensor) in norm_outputs:
                return True
            tensor = tensor._base
        return False

    def on_norm(module, args, output):
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(tensor, torch.Tensor):
            norm_outputs[id(tensor)] = module
            alive.append(tensor)

    def before(module, args, kwargs):
        if kwargs:
            for candidate in active:  # a sub-call with keyword arguments (masks, positions): not position-wise
                candidate.reason = candidate.reason or (
                    f"calls {type(module).__name__} with keyword arguments (not position-wise)"
                )
        if (
            len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)
            and args[0].dim() >= 2
            and any(True for _ in module.children())
            and module not in norm_modules
            and id(args[0]) not in claimed
            and produced_by_norm(args[0])
        ):
            claimed.add(id(args[0]))
            alive.append(args[0])
            candidate = _Candidate(module, tuple(args[0].shape), args[0]._version)
            active.append(candidate)
            result.mlps[module] = candidate

    def after(module, args, kwargs, output):
        if not active or active[-1].module is not module:
            return
        candidate = active.pop()
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

    def on_head(module, args, output):
        if recorder or not isinstance(output, torch.Tensor):
            return
        result.head = module
        mode = _TransformRecorder(output)
        mode.__enter__()
        recorder.append(mode)

    def loss_stand_in(*args: Any, **kwargs: Any) -> Any:
        logits = kwargs.get("logits", args[0] if args else None)
        if recorder:
            mode = recorder.pop()
            mode.__exit__(None, None, None)
            if isinstance(logits, torch.Tensor) and id(logits) in mode.index:
                result.transform = LogitTransform(mode.nodes, mode.index[id(logits)])
            else:
                result.head_problem = "the model's loss is not computed from its output head's logits"
        raise _TraceDone

    was_training = {m: m.training for m in model.modules()}
    loss_before = model.__dict__.get("_loss_function", _MISSING)
    token = _tracing.set(True)
    try:
        with _one_layer_of_each_kind(model, one_layer_each), _shape_only_layers(model, meta):
            for norm in norm_modules:
                handles.append(norm.register_forward_hook(on_norm))
            for module in model.modules():
                if module is model or not any(True for _ in module.children()):
                    continue
                handles.append(module.register_forward_pre_hook(before, with_kwargs=True, prepend=True))
                handles.append(module.register_forward_hook(after, with_kwargs=True))
            for module in model.modules():  # leaves: only the keyword-argument check
                if not any(True for _ in module.children()) and module not in norm_modules:
                    handles.append(module.register_forward_pre_hook(before, with_kwargs=True, prepend=True))
            if head is not None:
                handles.append(head.register_forward_hook(on_head))
            model.__dict__["_loss_function"] = loss_stand_in
            # as plan's trace: bitsandbytes repacks CPU weights on an eval-mode forward
            set_training_flags(model.modules())
            with torch.no_grad():
                try:
                    model(**_trace_inputs(model, inputs_kind), use_cache=False)
                except _TraceDone:
                    pass
    finally:
        while recorder:
            recorder.pop().__exit__(None, None, None)
        for handle in handles:
            handle.remove()
        for module, training in was_training.items():
            module.training = training
        if loss_before is _MISSING:
            model.__dict__.pop("_loss_function", None)
        else:
            model.__dict__["_loss_function"] = loss_before
        _tracing.reset(token)
    if result.head is None:
        result.head_problem = "the forward with labels never called the output head"
    elif result.transform is None and result.head_problem is None:
        result.head_problem = "the forward with labels never called the model's loss_function"
    elif result.transform is not None and result.transform.opaque:
        result.head_problem = (
            f"the model transforms its logits before the loss with {', '.join(result.transform.opaque)}, "
            "which is not elementwise and cannot be replayed on blocks of tokens"
        )
    return result


_MISSING = object()


def _trace_inputs(model: nn.Module, inputs_kind: str) -> dict[str, torch.Tensor]:
    if inputs_kind == "real":
        ids = plan._trace_input(model)["input_ids"]
        return {"input_ids": ids, "labels": ids}
    ids = torch.zeros((1, 2), dtype=torch.long, device="meta")
    inputs = {"input_ids": ids, "labels": ids}
    if inputs_kind == "meta with a 4-D mask":
        inputs["attention_mask"] = torch.ones((1, 1, 2, 2), dtype=torch.bool, device="meta").tril()
    return inputs


# ---- what will be blocked (decided before any change) ---------------------------------------------------------------


@dataclasses.dataclass
class BlocksPlan:
    """What prepare() blocks, and how many tokens per block."""

    size: int
    source: str  # "argument", "backend default", "shrunk by memory pressure"
    head: nn.Module | None  # the output head whose logits and loss run in blocks (None: left alone)
    head_name: str | None
    transform: LogitTransform | None
    mlps: dict[str, _Candidate]  # name -> how to block it
    left_alone: dict[str, str]  # name or part -> why


def recorded_classes(model: nn.Module) -> tuple[tuple[type, ...], tuple[str, ...]]:
    """Module classes (and class-name suffixes) whose outputs transformers records through hooks for a model
    output other than hidden states and attentions: MoE routers, for the auxiliary loss."""
    classes: list[type] = []
    names: list[str] = []
    for module in model.modules():
        spec = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(spec, dict):
            continue
        for key, value in spec.items():
            if key in ("hidden_states", "attentions", "cross_attentions"):
                continue
            for recorder in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(recorder, type):
                    classes.append(recorder)
                    continue
                target = getattr(recorder, "target_class", None)
                if isinstance(target, type):
                    classes.append(target)
                class_name = getattr(recorder, "class_name", None)
                if isinstance(class_name, str):
                    names.append(class_name)
    return tuple(classes), tuple(names)


def _collector_var() -> Any:
    """transformers 5's output collector (a context variable holding lists of recorded outputs), or None."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    return getattr(output_capturing, "_active_collector", None)


def build_plan(
    model: nn.Module, token_blocks: int | str | None, size: Callable[[int], tuple[int, str]]
) -> BlocksPlan | None:
    """Decide what to block. ``size(bytes_per_token)`` gives the block size and its source for "auto".

    Raises ValueError (before any change) when an explicit block size is asked for and the model's head and loss
    cannot be blocked: its logits go through a transform that cannot be replayed on blocks, or the trace failed.
    """
    if token_blocks is None:
        return None
    base = hf_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    found = trace(base)
    left_alone: dict[str, str] = {}
    explicit = token_blocks != AUTO
    problem = None
    if found.error is not None:
        problem = f"a trace of its forward with labels failed ({found.error})"
    elif found.head is not None:
        problem = found.head_problem or _loss_problem(base)
    if problem is not None and explicit:
        raise ValueError(
            f"token_blocks={token_blocks!r}: the output head and loss of this model cannot run in token blocks: "
            f"{problem}. Pass token_blocks='auto' to block only what can be blocked (the report says what), or "
            "token_blocks=None."
        )
    head = found.head if problem is None else None
    head_name = names.get(id(found.head)) if found.head is not None else None
    if head is None:
        left_alone[head_name or "output head"] = problem or found.head_problem or "no output head"

    mlps = _expand_mlps(model, base, found, names, left_alone)
    if not mlps and not any(key != (head_name or "output head") for key in left_alone):
        left_alone["MLPs"] = (
            "no module takes a norm's output alone and returns its shape (the feed-forward may be inline in the "
            "decoder layer, as in OPT)"
        )
    widths = [4 * _out_features(head)] if head is not None else []
    widths += [4 * _widest_leaf(candidate.module) for candidate in mlps.values()]
    if explicit:
        assert isinstance(token_blocks, int)
        block, source = token_blocks, "argument"
    else:
        block, source = size(max(widths, default=1))
    return BlocksPlan(block, source, head, head_name, found.transform if head else None, mlps, left_alone)


def _loss_problem(model: nn.Module) -> str | None:
    prop = getattr(type(model), "loss_function", None)
    if not isinstance(prop, property) or prop.fset is None:
        return "this transformers version has no settable loss_function"
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:
        return "this transformers version has no loss mapping"
    current = loss_function(model)
    current = getattr(current, "blocked_loss_of", current)  # an earlier prepare()'s blocked loss
    causal = LOSS_MAPPING.get("ForCausalLM")
    if current is not causal:
        name = getattr(current, "__name__", type(current).__name__)
        return f"its loss_function is {name}, not transformers' ForCausalLMLoss, whose blocked form this is"
    return None


def _expand_mlps(
    model: nn.Module, base: nn.Module, found: Trace, names: dict[int, str], left_alone: dict[str, str]
) -> dict[str, _Candidate]:
    """The traced MLPs (one layer of each kind) applied to every layer: same place in the layer, same structure."""
    recorded, recorded_names = recorded_classes(base)
    merging = _collector_var() is not None
    by_pattern: dict[tuple[str, tuple], _Candidate] = {}
    for module, candidate in found.mlps.items():
        name = names.get(id(module))
        if name is None:
            continue
        pattern = plan.layer_pattern(name)
        if candidate.reason is None:
            # a record on the block itself is taken once, around the blocked forward (its tuple output merged);
            # one on a submodule (a router) is taken once per block and must be merged back
            records = [
                type(m).__name__
                for n, m in module.named_modules()
                if n and (isinstance(m, recorded) or any(f"{name}.{n}".endswith(s) for s in recorded_names))
            ]
            if records and not merging:
                candidate.reason = (
                    f"transformers records the outputs of its {records[0]} (router logits for the auxiliary loss) "
                    "per call, and this transformers version keeps those records out of reach: blocks would "
                    "split them"
                )
            candidate.records = bool(records)
        if candidate.reason is not None:
            left_alone[pattern] = candidate.reason
            continue
        by_pattern[(pattern, _signature(module))] = candidate
    out: dict[str, _Candidate] = {}
    for name, module in model.named_modules():
        key = (plan.layer_pattern(name), _signature(module))
        if name and key in by_pattern:
            out[name] = dataclasses.replace(by_pattern[key], module=module)
    return out


def _out_features(module: nn.Module) -> int:
    width = getattr(module, "out_features", None)
    if isinstance(width, int):
        return width
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 1


def _widest_leaf(module: nn.Module) -> int:
    return max((_out_features(m) for m in module.modules() if not any(True for _ in m.children())), default=1)


# ---- installed on the model -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """One forward of the model: whether its head is blocked, and what the head was given."""

    handle: Any = None
    head: nn.Module | None = None
    hidden: torch.Tensor | None = None
    used: bool = False


class HeadAndLoss:
    """The forward pre-hook, the one-shot head hook, the loss function and the output fix-up of one model."""

    def __init__(self, model: nn.Module, size: int, transform: LogitTransform, original_loss: Callable) -> None:
        self.model = model
        self.size = size
        self.transform = transform
        self.original_loss = original_loss
        self.calls: list[_Call] = []
        self._signature: inspect.Signature | None = None

    def install(self) -> list:
        loss = self.loss
        loss_function = functools.wraps(self.original_loss)(lambda *args, **kwargs: loss(*args, **kwargs))
        loss_function.blocked_loss_of = self.original_loss  # type: ignore[attr-defined]
        return [
            self.model.register_forward_pre_hook(self.before, with_kwargs=True),
            self.model.register_forward_hook(self.after, with_kwargs=True, always_call=True),
            AttributeOverride(self.model, "_loss_function", loss_function),
        ]

    def _labels(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if "labels" in kwargs:
            return kwargs["labels"]
        if len(args) < 2:
            return None
        try:
            if self._signature is None:
                self._signature = inspect.signature(module.forward)
            return self._signature.bind_partial(*args).arguments.get("labels")
        except (TypeError, ValueError):
            return None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _Call()
        self.calls.append(call)
        if _tracing.get() or not module.training or self._labels(module, args, kwargs) is None:
            return
        head = output_embeddings(module)  # now: a peft wrapper added after prepare() is the one called
        if head is not None:
            call.head = head
            call.handle = head.register_forward_pre_hook(functools.partial(self._keep_hidden, call), prepend=True)

    def _keep_hidden(self, call: _Call, head: nn.Module, args: tuple) -> tuple | None:
        call.handle.remove()
        call.handle = None
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
            return None
        if hidden.numel() // max(1, hidden.shape[-1]) <= self.size:
            return None  # one block: the head runs as usual, the loss is transformers' own
        call.hidden = hidden
        return (hidden[..., :0, :], *args[1:])  # the head runs on no tokens: a [batch, 0, vocab] stand-in

    def loss(
        self,
        logits: Any,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: Any = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = self.calls[-1] if self.calls else None
        if (
            call is None
            or call.hidden is None
            or call.used
            or not isinstance(logits, torch.Tensor)
            or logits.dim() < 2
            or logits.shape[-2] != 0
        ):
            return self.original_loss(
                logits,
                labels,
                vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        call.used = True
        assert call.head is not None
        return blocked_causal_lm_loss(
            call.hidden,
            call.head,
            self.transform,
            labels,
            vocab_size,
            self.size,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
        )

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self.calls.pop() if self.calls else None
        if call is None:
            return None
        if call.handle is not None:  # the head was never called (a forward that computes its own head)
            call.handle.remove()
        if not call.used:
            return None
        logits = output.get("logits") if isinstance(output, dict) else None
        if logits is None:
            return None
        # as Liger's skip_logits: the logits were never built at full length
        fields = {key: value for key, value in output.items() if key != "logits"}
        try:
            return type(output)(**fields)
        except TypeError:  # an output class that cannot be rebuilt from its items: its logits item set to None
            output["logits"] = None
            return output


def blocked_causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    vocab_size: int,
    size: int,
    num_items_in_batch: Any = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss, computed from the head's input in blocks of `size` tokens: shift (unless
    `shift_labels`), ignore_index, sum over the labelled tokens divided by their count or by `num_items_in_batch`.
    Each block's logits exist only inside its checkpoint: recomputed in backward, never kept."""
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1])
    if rows.shape[0] != targets.shape[0]:
        raise ValueError(
            f"the labels have {targets.shape[0]} positions for {rows.shape[0]} hidden states (token blocks)"
        )
    labelled = targets != ignore_index
    count = int(labelled.sum())  # one synchronisation per step
    if count < rows.shape[0] * COMPACT_BELOW:  # padding, prompt tokens: score only the labelled rows
        index = labelled.nonzero().squeeze(1)
        rows, targets = rows.index_select(0, index), targets.index_select(0, index)
    block = functools.partial(_block_loss, head, transform, vocab_size, ignore_index)
    total: torch.Tensor | None = None
    for start in range(0, rows.shape[0], size):
        part = _checkpointed(block, rows[start : start + size], targets[start : start + size])
        total = part if total is None else total + part
    if total is None:  # no labelled token at all: 0 / 0 as cross_entropy's mean gives, still attached to the graph
        total = rows.sum() * 0.0
    if num_items_in_batch is None:
        return total / count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _block_loss(
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
    ignore_index: int,
    rows: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    logits = transform(head(rows.unsqueeze(0)))
    return nn.functional.cross_entropy(
        logits.float().view(-1, vocab_size), targets, ignore_index=ignore_index, reduction="sum"
    )


def _checkpointed(function: Callable, *args: Any) -> Any:
    if not torch.is_grad_enabled():
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False)


class _RecordedOutputs:
    """transformers 5's collected outputs (router logits) during one blocked MLP call, merged back to one entry per
    call: what the unblocked call would have recorded."""

    def __init__(self) -> None:
        var = _collector_var()
        collected = var.get() if var is not None else None
        self.collected = collected if isinstance(collected, dict) else None
        self.lengths = (
            {k: len(v) for k, v in self.collected.items() if isinstance(v, list)} if self.collected is not None else {}
        )

    def merge(self, blocks: int, rows: list[int]) -> None:
        if self.collected is None:
            return
        for key, start in self.lengths.items():
            entries = self.collected[key]
            grown = entries[start:]
            if not grown:
                continue
            if len(grown) % blocks:
                raise RuntimeError(
                    f"portable_kbit token blocks: {len(grown)} recorded {key!r} entries from {blocks} blocks; "
                    "cannot merge them. Pass token_blocks=None to prepare()."
                )
            per = len(grown) // blocks
            entries[start:] = [_concat_rows([grown[b * per + j] for b in range(blocks)], rows) for j in range(per)]


def _concat_rows(parts: list[Any], rows: list[int]) -> Any:
    if not all(isinstance(p, torch.Tensor) for p in parts):
        return parts[0] if all(p is None for p in parts) else parts
    for dim in range(parts[0].dim()):
        if all(p.shape[dim] == n for p, n in zip(parts, rows, strict=True)):
            return torch.cat(parts, dim=dim)
    raise RuntimeError(
        f"portable_kbit token blocks: cannot merge recorded outputs of shapes {[tuple(p.shape) for p in parts]}. "
        "Pass token_blocks=None to prepare()."
    )


def _blocked_mlp_forward(module: nn.Module, size: int, candidate: _Candidate) -> Callable[[Callable], Callable]:
    """The MLP's forward over blocks of `size` tokens, around `inner` (what it replaces: flow.ForwardOverride)."""
    records = candidate.records
    tuple_output = candidate.kind == "tuple"

    def make(inner: Callable) -> Callable:
        return _blocked(module, size, candidate, inner, records, tuple_output)

    return make


def _blocked(
    module: nn.Module, size: int, candidate: _Candidate, inner: Callable, records: Any, tuple_output: bool
) -> Callable:

    def run(block: torch.Tensor) -> Any:
        return inner(block.clone() if candidate.mutates_input else block)

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not module.training or _tracing.get() or not isinstance(x, torch.Tensor) or x.dim() < 2:
            return inner(x, *args, **kwargs)
        width = x.shape[-1]
        tokens = x.numel() // max(1, width)
        if tokens <= size:
            return inner(x)
        flat = x.reshape(-1, width)
        recorded = _RecordedOutputs() if records else None
        outputs, rows = [], []
        for start in range(0, tokens, size):
            block = flat[start : start + size].unsqueeze(0)
            outputs.append(_checkpointed(run, block))
            rows.append(block.shape[1])
        if recorded is not None:
            recorded.merge(len(outputs), rows)
        if not tuple_output:
            return torch.cat(outputs, dim=1).view(x.shape)
        first = torch.cat([o[0] for o in outputs], dim=1).view(x.shape)
        rest = [torch.cat([o[i] for o in outputs], dim=0) for i in range(1, len(outputs[0]))]
        return (first, *rest)

    return forward


def install(model: nn.Module, blocks: BlocksPlan) -> list:
    """Install the blocked head/loss and MLP forwards; returns removable handles."""
    handles: list = []
    if blocks.head is not None and blocks.transform is not None:
        base = hf_model(model)
        original = loss_function(base)
        if original is None:  # build_plan checked it: a bug if it is gone
            raise RuntimeError("the model's loss_function disappeared between planning and installing token blocks")
        original = getattr(original, "blocked_loss_of", original)
        handles += HeadAndLoss(base, blocks.size, blocks.transform, original).install()
    for candidate in blocks.mlps.values():
        handles.append(
            ForwardOverride(candidate.module, _blocked_mlp_forward(candidate.module, blocks.size, candidate))
        )
    return handles
