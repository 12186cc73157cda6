"""What a model does to its logits between the output head and the loss (Gemma's soft-capping, Cohere's
``logit_scale``, Granite's ``logits_scaling``, any elementwise op), recorded once by the trace and replayed on each
block of tokens.

The recorder is a ``TorchFunctionMode`` that notes every torch call taking the head's output, or something computed
from it; the replay runs those calls again on another tensor. A call that is not elementwise (or reads a tensor that
is not a parameter or a one-element constant) is recorded as opaque: it cannot be replayed on blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

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


class TransformRecorder(TorchFunctionMode):
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
