"""The decoder layers: the one map of a model's stack of repeated layers, and the layer index in module names.

Everything that works per layer asks here: the trace (one layer of each kind), the forecast (a sample of identical
layers), layer mode (every layer transformers checkpoints) and the plan (a norm's name in another layer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

from torch import nn

#: a layer index in a qualified module name ("model.layers.3.mlp" -> 3)
LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def layer_pattern(name: str) -> str:
    """The name with every layer index as ``*``: what a module is, whichever layer it is in."""
    return LAYER_INDEX.sub(".*", name)


def layer_indices(name: str) -> list[str]:
    return LAYER_INDEX.findall(name)


def fill_pattern(pattern: str, indices: Sequence[str]) -> str | None:
    """The concrete name of `pattern` in the layer(s) `indices` (None: the pattern has more indices than given)."""
    parts = pattern.split(".*")
    if len(parts) - 1 > len(indices):
        return None
    out = parts[0]
    for index, part in zip(indices[: len(parts) - 1], parts[1:], strict=True):
        out += "." + index + part
    return out


def structure(layer: nn.Module) -> Hashable:
    """What makes two layers of one kind: the names and classes of their submodules."""
    return tuple((name, type(m).__name__) for name, m in layer.named_modules())


def same_kind(name: str, module: nn.Module) -> Hashable:
    """What makes two modules the same part of their layers: the place in the layer and the structure."""
    return layer_pattern(name), structure(module)


def in_every_layer(model: nn.Module, found: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules of `model` that are the same part of their layer as one of `found` (by name; what a trace of one
    layer of each kind saw), in every layer."""
    kinds = {same_kind(name, module) for name, module in found.items()}
    return {name: m for name, m in model.named_modules() if name and same_kind(name, m) in kinds}


def _checkpointing_layer_class() -> type | None:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers before the class existed
        return None
    return GradientCheckpointingLayer


@dataclasses.dataclass(frozen=True)
class DecoderLayers:
    """A model's stack of decoder layers: the ``nn.ModuleList`` ``parent.<attribute>``, named ``name``."""

    name: str
    parent: nn.Module
    attribute: str
    layers: nn.ModuleList

    def __len__(self) -> int:
        return len(self.layers)

    def first_of_each_kind(self, key: Callable[[nn.Module], Hashable] = structure) -> list[nn.Module]:
        """The first layer of each kind (by `key`), in order: what a forward needs to meet every kind once."""
        kept: dict[Hashable, nn.Module] = {}
        for layer in self.layers:
            kept.setdefault(key(layer), layer)
        return list(kept.values())

    @contextlib.contextmanager
    def only(self, layers: Sequence[nn.Module]) -> Iterator[None]:
        """The stack holds only `layers` (renumbered from 0) for the duration of the block; then all of them again.

        The ModuleList stays the same object: its item store is swapped (a forward iterates the list it holds)."""
        original = self.layers.__dict__["_modules"]
        self.layers.__dict__["_modules"] = OrderedDict((str(i), layer) for i, layer in enumerate(layers))
        try:
            yield
        finally:
            self.layers.__dict__["_modules"] = original

    def period(self, config: Any) -> int:
        """The smallest repeat of the config's ``layer_types`` (sliding and full attention alternating); 1 without."""
        types = list(getattr(config, "layer_types", None) or [])
        count = len(self.layers)
        if len(types) != count:
            return 1
        for period in range(1, count + 1):
            if all(types[i] == types[i % period] for i in range(count)):
                return period
        return count


def decoder_layers(model: nn.Module) -> DecoderLayers | None:
    """The model's decoder layers: the ``nn.ModuleList`` of transformers' gradient-checkpointing layers (where the
    model has several, the one with ``config.num_hidden_layers`` of them, else the longest); for a model without that
    class, its longest ``nn.ModuleList`` of more than one module. None: no such list."""
    layer_class = _checkpointing_layer_class()
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n and len(m)]
    stacks = [(n, m) for n, m in lists if layer_class is not None and all(isinstance(x, layer_class) for x in m)]
    if not stacks:
        stacks = [(n, m) for n, m in lists if len(m) > 1]
    if not stacks:
        return None
    wanted = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    matching = [(n, m) for n, m in stacks if len(m) == wanted]
    name, layers = max(matching or stacks, key=lambda item: len(item[1]))
    parent_name, _, attribute = name.rpartition(".")
    return DecoderLayers(name, model.get_submodule(parent_name), attribute, layers)


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """Every layer that transformers' gradient checkpointing wraps (decoder layers, and those of an encoder or a
    vision tower beside them); for a model without that class, its decoder layers."""
    layer_class = _checkpointing_layer_class()
    layers = [m for m in model.modules() if layer_class is not None and isinstance(m, layer_class)]
    if layers:
        return layers
    stack = decoder_layers(model)
    return list(stack.layers) if stack is not None else []
