"""What a model holds, snapshot and put back exactly: every module's own attributes (parameters, buffers,
submodules, hooks, the training flag, instance forwards, plain tensors, flags a forward set) and its configs.

Two users, both over a short window in which nothing but portable_kbit touches the model: the trace (a forward on
stand-ins must leave no trace of itself, whatever the model's own forward set: CTRL caches its position table,
BigBird switches its attention type, transformers marks a model whose output-capturing hooks it installed), and
prepare()'s transaction (a failure leaves the model as it was). Parameter *values* are not covered (a cast changes a
parameter in place: the cast journal undoes it), nor is anything outside the modules and their configs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..constants import MISSING

_CONTAINERS = (dict, set, list)


class _ObjectState:
    """One object's ``__dict__``: its entries, and the contents of the dicts, sets and lists among them (hook
    dicts, ``_parameters``, ``_modules`` ...), which change in place."""

    __slots__ = ("contents", "entries", "obj")

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.entries = dict(obj.__dict__)
        # empty containers are only recorded as such (most of a module's hook dicts): fewer objects to allocate
        self.contents = {
            key: (value.copy() if value else None)
            for key, value in self.entries.items()
            if type(value) in _CONTAINERS or isinstance(value, dict)
        }

    def restore(self) -> None:
        now = self.obj.__dict__
        for key in [k for k in now if k not in self.entries]:
            del now[key]
        for key, value in self.entries.items():
            if now.get(key, MISSING) is not value:
                now[key] = value
        for key, saved in self.contents.items():
            container = self.entries[key]
            # put back in place, never compared: == on tensors (a _parameters dict's values) is elementwise
            if isinstance(container, list):
                container[:] = saved or []
            else:
                container.clear()
                if saved:
                    container.update(saved)


def _configs(modules: Iterable[nn.Module]) -> list[Any]:
    """The configs the modules hold (``module.config``) and their sub-configs, each once."""
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return []
    found: dict[int, Any] = {}
    stack = [m.__dict__.get("config") for m in modules]
    while stack:
        config = stack.pop()
        if not isinstance(config, PretrainedConfig) or id(config) in found:
            continue
        found[id(config)] = config
        stack += [value for value in config.__dict__.values() if isinstance(value, PretrainedConfig)]
    return list(found.values())


class ModelState:
    """A snapshot of `model`'s modules (every module reachable now) and their configs; ``restore()`` puts each
    back as it was, drops what was added, and detaches modules added since (they are no longer referenced)."""

    def __init__(self, model: nn.Module) -> None:
        modules = list(model.modules())
        self.objects = [_ObjectState(m) for m in modules] + [_ObjectState(c) for c in _configs(modules)]

    def restore(self) -> None:
        for state in self.objects:
            state.restore()
