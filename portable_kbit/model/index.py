"""One walk of the model, shared by prepare()'s steps: its modules and parameters by name.

prepare() used to walk the module tree a dozen times (the plan, the adapter lookup, the trace, the hooks, the undo
log, the freeze); on a 7B model each walk is about a millisecond of Python. The index is built once per call, before
any change, and describes the model as it was then.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .quantized import quantization_kind


class ModelIndex:
    """The model's modules and parameters, each found once (shared and tied ones under their first name)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: dict[str, nn.Module] = {}  # name -> module, in named_modules() order; "" is the model
        self.parameter_names: dict[str, nn.Parameter] = {}  # every name of every parameter, tied names included
        self.parameters: dict[str, nn.Parameter] = {}  # each parameter once, under its first name
        seen_modules: set[int] = set()
        seen_parameters: set[int] = set()
        for module_name, module in model.named_modules(remove_duplicate=False):
            if id(module) not in seen_modules:
                seen_modules.add(id(module))
                self.modules[module_name] = module
            prefix = module_name + "." if module_name else ""
            for attr, param in module._parameters.items():
                if param is None:
                    continue
                name = prefix + attr
                self.parameter_names[name] = param
                if id(param) not in seen_parameters:
                    seen_parameters.add(id(param))
                    self.parameters[name] = param

    def module_list(self) -> list[nn.Module]:
        return list(self.modules.values())

    def leaves(self) -> dict[str, nn.Module]:
        """Modules without children, by name (the model itself excluded)."""
        return {name: m for name, m in self.modules.items() if name and not m._modules}

    @functools.cached_property
    def quantized(self) -> dict[str, str]:
        """Quantized parameters by name -> the quantizer's name (see quantized.quantization_kind)."""
        return {name: kind for name, p in self.parameters.items() if (kind := quantization_kind(p)) is not None}

    @functools.cached_property
    def devices(self) -> list[torch.device]:
        """The devices the parameters live on, in order of first appearance."""
        seen: dict[torch.device, None] = {}
        # Quantized tensor subclasses route every attribute read through __torch_function__: skip it, only .device
        # is read. Parameters only: optimum-quanto keeps each QLinear's activation-scale buffers on the CPU of a
        # GPU/MPS model, which would read as a CPU-offloaded model.
        with torch._C.DisableTorchFunctionSubclass():
            for param in self.parameters.values():
                seen[param.device] = None
        return list(seen)


def as_index(model: nn.Module | ModelIndex) -> ModelIndex:
    """The index itself, or a new one of the model."""
    return model if isinstance(model, ModelIndex) else ModelIndex(model)
