"""TF32 for fp32 matmuls on CUDA: torch's process-wide precision setting, as a patch that puts back what it found.

prepare(tf32=True) on a GPU with TF32 tensor cores (NVIDIA Ampere or newer): the fp32 matmuls of the flow (the
adapters', lm_head's where it is upcast in blocks rather than computed from bf16 parts, a base layer that computes in
its fp32 input's dtype) run on TF32 tensor cores, inputs rounded to a 10-bit mantissa and sums kept in fp32. It is what
``transformers.TrainingArguments(tf32=True)`` sets, and, like it, it holds for the whole process, not only this model:
the setting is torch's, and torch reads it per matmul, also in the backward, which runs outside any scope prepare()
could open.
"""

from __future__ import annotations

from typing import Any

import torch

from .protocol import Patch


def _matmul_settings() -> Any:
    return torch.backends.cuda.matmul


class Tf32Matmuls(Patch):
    """torch's fp32 matmul precision on CUDA set to TF32; removing it puts back the previous value where the TF32
    setting still stands (a later change by someone else is theirs to keep)."""

    # torch 2.9+ spells it torch.backends.cuda.matmul.fp32_precision ("ieee" / "tf32"); before, allow_tf32
    ATTRIBUTE = "fp32_precision" if hasattr(torch.backends.cuda.matmul, "fp32_precision") else "allow_tf32"
    ON: object = "tf32" if ATTRIBUTE == "fp32_precision" else True

    def __init__(self) -> None:
        self.previous: object = None
        self.applied = False

    def apply(self) -> None:
        matmul = _matmul_settings()
        self.previous = getattr(matmul, self.ATTRIBUTE)
        setattr(matmul, self.ATTRIBUTE, self.ON)
        self.applied = True

    def is_live(self) -> bool:
        return self.applied and getattr(_matmul_settings(), self.ATTRIBUTE) == self.ON

    def remove(self) -> None:
        if self.is_live():
            setattr(_matmul_settings(), self.ATTRIBUTE, self.previous)
        self.applied = False

    def describe(self) -> str:
        was = "" if self.previous == self.ON else f", was {self.previous!r}"
        return f"torch.backends.cuda.matmul.{self.ATTRIBUTE} = {self.ON!r}{was}"
