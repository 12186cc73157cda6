"""The one patch protocol: everything prepare() installs on a model is a Patch, applied once, removable, and kept
in the call's PatchSet.

``remove()`` puts back exactly what ``apply()`` replaced, and does nothing where the patch no longer stands
(removed already, or replaced since by someone else): it checks what is on the model, never a flag of its own, so a
model put back by a snapshot (a failed prepare()) makes its patches live again. A repeat prepare() removes the last
call's set first (``PatchSet.supersede``): the patches of one call always sit on the model as it was before any
prepare(), and a set comes off newest first, so a patch that wraps another of its call comes off before it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..constants import MISSING

Forward = Callable[..., Any]
P = TypeVar("P", bound="Patch")


class Patch:
    """Something prepare() installs on a model."""

    def apply(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError


class Hook(Patch):
    """A forward hook (``pre=False``) or forward pre-hook on a module, with torch's registration options."""

    def __init__(self, module: nn.Module, hook: Callable[..., Any], *, pre: bool, **options: bool) -> None:
        self.module, self.hook, self.pre, self.options = module, hook, pre, options
        self.handle: Any = None

    def apply(self) -> None:
        register = self.module.register_forward_pre_hook if self.pre else self.module.register_forward_hook
        self.handle = register(self.hook, **self.options)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()  # torch's handle: nothing happens where the hook is gone


def _class_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(module).forward(module, *args, **kwargs)


class InstanceForward(Patch):
    """An instance ``forward`` built around the one it replaces: ``make_forward(call_previous)``.

    What it replaces is the instance forward standing there (accelerate's device hooks, another patch of the same
    call), else the class's forward, looked up at call time: FSDP2's ``fully_shard`` swaps the module's class after
    prepare(), and transformers' checkpointing wrapper checkpoints only a class's own forward.
    """

    def __init__(self, module: nn.Module, make_forward: Callable[[Forward], Forward]) -> None:
        self.module = module
        self.make_forward = make_forward
        self.previous: Forward | None = None
        self.forward: Forward | None = None

    def apply(self) -> None:
        current = self.module.__dict__.get("forward")
        self.previous = current
        call_previous = current if current is not None else functools.partial(_class_forward, self.module)
        forward = self.make_forward(call_previous)
        forward.patch = self  # type: ignore[attr-defined]  # which patch stands there: for debugging and tests
        self.forward = forward
        self.module.__dict__["forward"] = forward

    def is_live(self) -> bool:
        return self.forward is not None and self.module.__dict__.get("forward") is self.forward

    def remove(self) -> None:
        if not self.is_live():
            return
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.previous


class InstanceAttribute(Patch):
    """An instance attribute (the model's ``_loss_function``, a method wrapper); removing it puts back what was
    there, or nothing where nothing was."""

    def __init__(self, obj: Any, attribute: str, value: Any) -> None:
        self.obj, self.attribute, self.value = obj, attribute, value
        self.previous: Any = MISSING

    def apply(self) -> None:
        self.previous = self.obj.__dict__.get(self.attribute, MISSING)
        self.obj.__dict__[self.attribute] = self.value

    def remove(self) -> None:
        if self.obj.__dict__.get(self.attribute, MISSING) is not self.value:
            return
        if self.previous is MISSING:
            self.obj.__dict__.pop(self.attribute, None)
        else:
            self.obj.__dict__[self.attribute] = self.previous


class PatchSet:
    """The patches of one prepare() call, in the order they were applied."""

    def __init__(self) -> None:
        self.patches: list[Patch] = []

    def apply(self, patch: P) -> P:
        """Apply `patch` and keep it; returns it."""
        patch.apply()
        self.patches.append(patch)
        return patch

    def extend(self, patches: list[Patch]) -> None:
        for patch in patches:
            self.apply(patch)

    def of_type(self, kind: type[P]) -> list[P]:
        return [patch for patch in self.patches if isinstance(patch, kind)]

    def remove(self) -> None:
        """Every patch off, newest first (one that wraps another of the set comes off before it)."""
        for patch in reversed(self.patches):
            patch.remove()

    def supersede(self, previous: PatchSet | None) -> None:
        """A repeat call: the last call's patches come off before this call's go on."""
        if previous is not None:
            previous.remove()
