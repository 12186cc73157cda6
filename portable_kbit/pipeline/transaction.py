"""prepare()'s transaction: a failure after the first change leaves the model exactly as it was.

What a call changes, and what undoes it, newest first: this call's patches (the patch set, removed), the casts (the
cast journal, downcast in place), a move to the device (moved back), everything else on the modules and their
configs (a snapshot taken on entry: transformers' gradient checkpointing and input-gradient hook, training flags,
the attention implementation, and the last call's patches, which a repeat call removed first), and the
``requires_grad`` flags the freeze changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import nn

from ..model.index import ModelIndex
from ..model.state import ModelState
from ..patches.protocol import PatchSet
from .cast import CastJournal


class Transaction:
    """prepare()'s changes, recorded as they are made; on an exception inside ``with``, undone, and the exception
    re-raised with a note that says so."""

    def __init__(self, model: nn.Module, index: ModelIndex) -> None:
        self.model = model
        self.index = index
        self.journal = CastJournal()
        self.patches = PatchSet()
        self.undo_steps: list[Callable[[], object]] = []

    def on_undo(self, step: Callable[[], object]) -> None:
        """Run `step` (its result is ignored) if the transaction fails, before the snapshot is put back."""
        self.undo_steps.append(step)

    def __enter__(self) -> Transaction:
        self.state = ModelState(self.model)
        self.requires_grad = {p: p.requires_grad for p in self.index.parameters.values()}
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> Literal[False]:
        if exc is None:
            return False
        steps = [self.patches.remove, self.journal.undo, *reversed(self.undo_steps), self.state.restore]
        steps.append(self._restore_requires_grad)
        failures = []
        for step in steps:
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

    def _restore_requires_grad(self) -> None:
        for param, flag in self.requires_grad.items():
            param.requires_grad_(flag)
