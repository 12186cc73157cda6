"""Is this parameter quantized? By type where the quantizer's type is importable, never by class-name strings.

A quantizer's types are looked up only if its package is already imported: a model holding its tensors has imported
it, so nothing is imported (or printed) on its behalf. Anything else that is not a plain floating-point
torch.Tensor (an integer dtype, a tensor subclass) is treated as quantized by an unknown method: we refuse to guess.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

_KNOWN_TYPES_CACHE: dict[frozenset, list] = {}


def _known_types() -> list[tuple[str, tuple[type, ...]]]:
    # Called once per parameter: cache by which quantizer packages are imported.
    present = frozenset(name for name in ("bitsandbytes", "optimum.quanto", "torchao") if name in sys.modules)
    if present not in _KNOWN_TYPES_CACHE:
        _KNOWN_TYPES_CACHE[present] = _import_known_types()
    return _KNOWN_TYPES_CACHE[present]


def _import_known_types() -> list[tuple[str, tuple[type, ...]]]:
    known: list[tuple[str, tuple[type, ...]]] = []
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb

        known.append(("bitsandbytes-4bit", (bnb.nn.Params4bit,)))
        known.append(("bitsandbytes-8bit", (bnb.nn.Int8Params,)))
    if "optimum.quanto" in sys.modules:
        from optimum.quanto import QTensor

        # QTensors report their scale's float dtype (e.g. bfloat16): a dtype check alone takes them for float weights.
        known.append(("optimum-quanto", (QTensor,)))
    if "torchao" in sys.modules:
        try:
            from torchao.utils import TorchAOBaseTensor

            known.append(("torchao", (TorchAOBaseTensor,)))
        except ImportError:
            pass
    return known


def quantization_kind(tensor: torch.Tensor) -> str | None:
    """None for a plain floating-point tensor we may cast; else the quantizer's name ("unknown ..." if not ours)."""
    data = tensor.data if isinstance(tensor, nn.Parameter) and type(tensor) is nn.Parameter else tensor
    for kind, types in _known_types():
        if isinstance(tensor, types) or isinstance(data, types):
            return kind
    if type(tensor) not in (nn.Parameter, torch.Tensor) or type(data) is not torch.Tensor:
        return f"unknown tensor subclass {type(data).__name__}"
    if not tensor.dtype.is_floating_point:
        # GPTQ/AWQ/HQQ packed weights: integer storage
        return f"unknown integer weight ({str(tensor.dtype).replace('torch.', '')})"
    return None


def handles_its_own_input_dtype(module: nn.Module) -> bool:
    """bitsandbytes layers cast their input to the compute dtype and return the input's dtype themselves."""
    if "bitsandbytes" not in sys.modules:
        return False
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
