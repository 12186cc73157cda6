"""Which modules are norms: torch's norm types, or a model's own norm class with only 1-D parameters."""

from __future__ import annotations

from torch import nn

from .index import ModelIndex, as_index

TORCH_NORM_TYPES: tuple[type, ...] = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None
)


def is_norm(module: nn.Module) -> bool:
    """torch's norm types, or a model's own norm class (LlamaRMSNorm, GemmaRMSNorm ...): only 1-D parameters."""
    if isinstance(module, TORCH_NORM_TYPES):
        return True
    if module._modules or "norm" not in type(module).__name__.lower():
        return False
    params = [p for p in module._parameters.values() if p is not None]
    return bool(params) and all(p.dim() == 1 for p in params)


def norm_names(model: nn.Module | ModelIndex) -> list[str]:
    return [name for name, module in as_index(model).modules.items() if name and is_norm(module)]
