"""The casts: grouped in chunks under a byte budget, each recorded in a journal that undoes it exactly.

Every cast is an upcast (fp16/bf16 -> fp32), so undoing one is a downcast that gives back the original bits: nothing
needs to be kept in memory to restore a parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .plan import ParamCast

#: elements per block of an in-place downcast (a 4 MiB fp32 block, its half-precision copy 2 MiB)
IN_PLACE_BLOCK = 1 << 20


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
        """Newest first. A downcast needs room for the half-precision copy; where there is none (the undo of a
        prepare() that ran out of memory), it is written into the fp32 tensor's own storage instead, and moved to a
        storage of its own size once the other undos have freed memory."""
        in_place = []
        while self.done:
            cast = self.done.pop()
            param = getattr(cast.module, cast.attr)
            try:
                param.data = downcast(param.data, cast.old_dtype)
            except torch.OutOfMemoryError:
                param.data = downcast_in_place(param.data, cast.old_dtype)
                in_place.append(param)
        for param in in_place:
            try:
                param.data = param.data.clone()
            except torch.OutOfMemoryError:
                pass  # the values are restored; the storage stays twice their size until memory allows


def downcast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype)


def downcast_in_place(tensor: torch.Tensor, dtype: torch.dtype, block: int = IN_PLACE_BLOCK) -> torch.Tensor:
    """`tensor.to(dtype)` for a contiguous fp32 tensor and a 2-byte dtype, written into the tensor's own storage
    block by block: no allocation but one block. Element i goes to bytes [2i, 2i + 2), which only overlap fp32
    elements below i, already read. The result views the first half of the storage."""
    if not tensor.is_contiguous() or tensor.element_size() != 2 * torch.empty((), dtype=dtype).element_size():
        raise torch.OutOfMemoryError(f"no room to downcast a {tuple(tensor.shape)} tensor, and it cannot be in place")
    flat = tensor.view(-1)
    out = flat.view(dtype)[: flat.numel()]
    for start in range(0, flat.numel(), block):
        out[start : start + block].copy_(flat[start : start + block].to(dtype))
    return out.view(tensor.shape)
