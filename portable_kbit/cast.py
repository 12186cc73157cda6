"""Chunked, reversible dtype changes.

Every cast is an upcast (fp16/bf16 -> fp32), so undoing one is a downcast that gives back the original bits: nothing
needs to be kept in memory to restore a parameter.
"""

from __future__ import annotations

from collections.abc import Callable

from .plan import ParamCast


def chunked(casts: list[ParamCast], budget: int) -> list[list[ParamCast]]:
    """Group casts so that each chunk allocates at most `budget` new bytes (a larger tensor is a chunk of its own)."""
    chunks: list[list[ParamCast]] = []
    current: list[ParamCast] = []
    size = 0
    for cast in casts:
        if current and size + cast.new_bytes > budget:
            chunks.append(current)
            current, size = [], 0
        current.append(cast)
        size += cast.new_bytes
    if current:
        chunks.append(current)
    return chunks


def required_bytes(chunks: list[list[ParamCast]]) -> int:
    """Memory the casts need at their worst moment: the net growth of all of them, plus the largest chunk's old
    tensors (while a chunk is cast its old and new tensors both exist, and a caching allocator holds the freed old
    blocks until the one release at the end)."""
    growth = sum(c.new_bytes - c.old_bytes for chunk in chunks for c in chunk)
    largest = max((sum(c.old_bytes for c in chunk) for chunk in chunks), default=0)
    return growth + largest


class CastJournal:
    """The casts done so far, undone in reverse order on failure."""

    def __init__(self) -> None:
        self.done: list[ParamCast] = []

    def apply(self, chunk: list[ParamCast], before_each: Callable[[ParamCast], None] | None = None) -> None:
        for cast in chunk:
            if before_each is not None:
                before_each(cast)
            param = getattr(cast.module, cast.attr)
            param.data = param.data.to(cast.new_dtype)
            self.done.append(cast)

    def undo(self) -> None:
        while self.done:
            cast = self.done.pop()
            param = getattr(cast.module, cast.attr)
            param.data = param.data.to(cast.old_dtype)
