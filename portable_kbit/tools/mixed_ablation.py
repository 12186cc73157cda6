"""The ablations of activations="mixed" for the benchmarks: prepare() with only one of mixed's two bf16 halves."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

#: the ablations of activations="mixed": which of its two bf16 halves moves the learning curve. Each keeps one half by
#: stubbing the other's step in the prepare pipeline for the duration of one prepare() call (a measurement, not an
#: option: prepare() itself has no such knob)
MIXED_ABLATIONS = ("attention", "mlp")


@contextlib.contextmanager
def mixed_ablation(part: str | None) -> Iterator[None]:
    """prepare(activations="mixed") inside keeps only `part` of mixed in the model's dtype ("attention": q/k/v reach
    attention in bf16, the frozen MLPs stay fp32; "mlp": the reverse). None: unchanged."""
    if part is None:
        yield
        return
    if part not in MIXED_ABLATIONS:
        raise ValueError(f"mixed ablation {part!r}: expected one of {MIXED_ABLATIONS}")
    from ..pipeline import numerics
    from ..pipeline import prepare as pipeline

    switch = pipeline.switch_attention

    def no_frozen_mlps(*args: Any, **kwargs: Any) -> list[Any]:
        return []

    def fp32_attention(model: Any, index: Any, target: Any, activations: str, *rest: Any) -> Any:
        return switch(model, index, target, "fp32" if activations == "mixed" else activations, *rest)

    # each stub where its caller looks the step up: frozen_mlps in the dtype flow's step, the switch in prepare()
    module: types.ModuleType
    if part == "attention":
        module, name, stub = numerics, "frozen_mlps", no_frozen_mlps
    else:
        module, name, stub = pipeline, "switch_attention", fp32_attention
    original = getattr(module, name)
    setattr(module, name, stub)
    try:
        yield
    finally:
        setattr(module, name, original)
