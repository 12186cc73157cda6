"""Undo log for prepare(): a failure after the first change leaves the model exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import nn

from ..model.index import ModelIndex
from ..patches.hub_kernels import KERNELIZING_METHODS

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
# instance attributes prepare() may set: transformers' input-gradient hooks, our fp32 forward for lm_head and the
# blocked MLP forwards, the blocked loss_function (token blocks), the wrappers that follow a kernelization
RESTORED_ATTRIBUTES = (
    "_require_grads_hook",
    "_require_grads_hooks",
    "forward",
    "_loss_function",
    *KERNELIZING_METHODS,
)

_MISSING = object()


class Transaction:
    """Records undo steps; on an exception inside `with`, runs them newest first and re-raises with a note."""

    def __init__(self, model: nn.Module, index: ModelIndex | None = None) -> None:
        self.model = model
        self.index = index or ModelIndex(model)
        self.undo_steps: list[Callable[[], object]] = []

    def on_undo(self, step: Callable[[], object]) -> None:
        """Run `step` (its result is ignored) if the transaction fails; steps run newest first."""
        self.undo_steps.append(step)

    def __enter__(self) -> Transaction:
        self._remember_hooks_and_flags()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> Literal[False]:
        if exc is None:
            return False
        failures = []
        while self.undo_steps:
            step = self.undo_steps.pop()
            try:
                step()
            except Exception as undo_error:  # keep undoing: the rest of the model still matters
                failures.append(repr(undo_error))
        if hasattr(exc, "add_note"):
            if failures:
                exc.add_note(f"portable_kbit: prepare() failed and restoring the model also failed: {failures}")
            else:
                exc.add_note("portable_kbit: prepare() failed; the model was restored to its state before the call.")
        return False

    def _remember_hooks_and_flags(self) -> None:
        # Few objects on purpose: a 7B model has about a thousand modules, and allocating thousands of small sets
        # here used to trigger a full garbage collection (a fifth of a second) in the middle of prepare().
        modules = self.index.module_list()
        hook_keys = {
            (id(m), name): list(hooks) for m in modules for name in HOOK_DICTS if (hooks := m.__dict__.get(name))
        }
        training = {m: m.training for m in modules}
        attributes = {
            (m, attr): m.__dict__[attr] for m in modules for attr in RESTORED_ATTRIBUTES if attr in m.__dict__
        }
        requires_grad = {p: p.requires_grad for p in self.index.parameters.values()}
        checkpointing = {m: m.__dict__.get("gradient_checkpointing", _MISSING) for m in modules}
        checkpoint_funcs = {m: m.__dict__.get("_gradient_checkpointing_func", _MISSING) for m in modules}

        def restore() -> None:
            for m in modules:
                for name in HOOK_DICTS:
                    hooks = m.__dict__.get(name)
                    if not hooks:
                        continue
                    for key in set(hooks.keys()) - set(hook_keys.get((id(m), name), ())):
                        del hooks[key]
                for attr in RESTORED_ATTRIBUTES:  # what the call set, removed; what it replaced, put back
                    _restore_attribute(m, attr, attributes.get((m, attr), _MISSING))
            for m, flag in training.items():
                m.training = flag
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
            for m, value in checkpointing.items():
                _restore_attribute(m, "gradient_checkpointing", value)
            for m, value in checkpoint_funcs.items():
                _restore_attribute(m, "_gradient_checkpointing_func", value)

        self.on_undo(restore)


def _restore_attribute(module: nn.Module, attr: str, value: object) -> None:
    if value is _MISSING:
        module.__dict__.pop(attr, None)
    else:
        module.__dict__[attr] = value
