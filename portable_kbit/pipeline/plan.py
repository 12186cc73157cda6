"""Which parameters change: adapted modules -> the norms that feed them (from the trace), modules_to_save, per upcast
policy. Nothing here changes the model."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..constants import HALF_DTYPES
from ..model.hf import is_peft_model
from ..model.index import ModelIndex
from ..model.layers import fill_pattern, layer_indices, layer_pattern
from ..model.norms import norm_names
from ..model.trace import Trace
from .adapters import AdapterSpec, modules_to_save_wrappers

POLICIES = ("adjacent", "norms", "none", "peft")
#: how a frozen norm the policy selects gets fp32: computed in fp32 at call time (its parameters keep their dtype), or
#: its parameters cast to fp32 (v0.1's behaviour; trained parameters, modules_to_save, are always cast)
FROZEN_NORMS = ("compute", "upcast")


@dataclasses.dataclass
class ParamCast:
    """One parameter to upcast: reversible, since fp16/bf16 -> fp32 -> back is exact."""

    name: str
    module: nn.Module
    attr: str
    old_dtype: torch.dtype
    new_dtype: torch.dtype
    numel: int
    device: torch.device

    @property
    def old_bytes(self) -> int:
        return self.numel * _itemsize(self.old_dtype)

    @property
    def new_bytes(self) -> int:
        return self.numel * _itemsize(self.new_dtype)


@dataclasses.dataclass
class Plan:
    """Every change prepare() will make, worked out before any is made."""

    policy: str
    casts: list[ParamCast]
    upcast_norms: dict[str, torch.dtype]  # norm module name -> its dtype before the upcast (the flow's native dtype)
    compute_norms: list[str]  # the upcast norms computed in fp32 at call time: their parameters are not cast
    adapter_spec: AdapterSpec | None
    quantized: dict[str, str]  # parameter name -> quantizer
    already_fp32: list[str]
    notes: list[str]
    trace_seconds: float = 0.0  # the trace's, where the plan used it


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def adjacent_norms(
    feeding: dict[str, str | None], adapted: list[str], norms: list[str]
) -> tuple[list[str], list[str]]:
    """Concrete norm names that feed the adapted modules (the trace's `feeding`, by layer pattern), and notes on
    what could not be placed."""
    norm_set = set(norms)
    found: list[str] = []
    notes: list[str] = []
    unseen = sorted({layer_pattern(n) for n in adapted} - feeding.keys())
    if unseen:
        notes.append(f"not reached by the trace forward (no norm upcast for them): {unseen}")
    for name in adapted:
        norm_pattern = feeding.get(layer_pattern(name))
        if norm_pattern is None:
            continue
        norm = fill_pattern(norm_pattern, layer_indices(name))
        if norm in norm_set and norm not in found:
            found.append(norm)
    return found, notes


def needs_adapters(model: nn.Module, policy: str, target_modules: Any) -> bool:
    """Whether the plan needs to know where adapters go: for "adjacent", and for modules_to_save (which only a
    PeftModel or target_modules names: peft's defaults add nothing there)."""
    return policy == "adjacent" or target_modules is not None or is_peft_model(model)


def needs_trace(policy: str, spec: AdapterSpec | None) -> bool:
    """Whether the plan needs the trace: "adjacent" with known adapters (which norms feed them)."""
    return policy == "adjacent" and spec is not None


def build(
    model: nn.Module,
    policy: str,
    spec: AdapterSpec | None,
    found: Trace | None,
    frozen_norms: str = "compute",
    index: ModelIndex | None = None,
) -> Plan:
    """Work out every change prepare() will make, without making any: from where adapters go (`spec`) and, for
    "adjacent", the trace (`found`)."""
    index = index or ModelIndex(model)
    quantized = index.quantized
    notes: list[str] = []
    unknown = sorted({kind for kind in quantized.values() if kind.startswith("unknown")})
    if unknown:
        notes.append(f"treated as quantized and left untouched (quantizer not recognised): {unknown}")

    norms = norm_names(index)
    upcast_norms: list[str] = []
    if policy == "norms":
        upcast_norms = norms
    elif policy == "adjacent":
        if spec is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            notes.append(
                f"no adapter targets known for model_type {model_type!r}: every norm upcast. "
                "Pass target_modules (or a PeftModel) to upcast only the norms next to adapted layers."
            )
            upcast_norms = norms
        elif found is None or found.error is not None:  # a forward we cannot trace: refuse to guess small
            why = found.error if found is not None else "not traced"
            notes.append(f"trace forward failed ({why}); every norm upcast instead")
            upcast_norms = norms
        else:
            upcast_norms, trace_notes = adjacent_norms(found.feeding, spec.adapted, norms)
            notes += trace_notes

    names_to_cast: dict[str, None] = {}
    if policy == "peft":
        for name, p in index.parameters.items():
            if name not in quantized and p.dtype in HALF_DTYPES:
                names_to_cast[name] = None
    modules = index.modules
    trained_in_full = _modules_to_save_targets(index, spec)
    compute_norms: list[str] = []
    for norm in upcast_norms:
        if frozen_norms == "compute" and not any(norm == m or norm.startswith(m + ".") for m in trained_in_full):
            compute_norms.append(norm)
            continue
        for attr, value in modules[norm]._parameters.items():
            if value is not None:
                names_to_cast[f"{norm}.{attr}"] = None
    for module_name in trained_in_full:
        for name in index.parameter_names:
            if name.startswith(module_name + "."):
                names_to_cast[name] = None

    casts: list[ParamCast] = []
    already: list[str] = []
    seen: set[int] = set()
    params = index.parameter_names
    for name in names_to_cast:
        p = params[name]
        if id(p) in seen or name in quantized:
            continue
        seen.add(id(p))
        if p.dtype == torch.float32:
            already.append(name)
            continue
        if p.dtype not in HALF_DTYPES:
            continue
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name] if module_name else model
        casts.append(ParamCast(name, module, attr, p.dtype, torch.float32, p.numel(), p.device))

    cast_dtype_by_module = {id(c.module): c.old_dtype for c in casts}
    native = model_dtype(index)
    norm_dtypes = {}
    for norm in upcast_norms:
        module = modules[norm]
        own = [p for p in module._parameters.values() if p is not None]
        norm_dtypes[norm] = cast_dtype_by_module.get(id(module)) or native or (own[0].dtype if own else torch.float32)
    trace_seconds = found.seconds if found is not None else 0.0
    return Plan(policy, casts, norm_dtypes, compute_norms, spec, quantized, already, notes, trace_seconds)


def _modules_to_save_targets(index: ModelIndex, spec: AdapterSpec | None) -> list[str]:
    """Modules trained in full: the trainable copies of a PeftModel, or what the LoraConfig names."""
    if spec is None:
        return []
    if spec.source == "PeftModel":
        names = []
        for wrapper_name, wrapper in modules_to_save_wrappers(index).items():
            for adapter in getattr(wrapper, "modules_to_save", {}):
                names.append(f"{wrapper_name}.modules_to_save.{adapter}")
        return names
    return spec.modules_to_save


def model_dtype(index: ModelIndex) -> torch.dtype | None:
    """The dtype activations flow in natively: that of the first half-precision unquantized weight (None: none)."""
    for name, p in index.parameters.items():
        if p.dtype in HALF_DTYPES and name not in index.quantized:
            return p.dtype
    return None
