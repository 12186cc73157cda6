"""A full, comparable snapshot of a model's state, for "a failure leaves the model exactly as it was" tests.

Taken before a call and compared after it: every parameter's and buffer's type, dtype, device, requires_grad and
raw bytes (tensor subclasses such as optimum-quanto's QTensors are compared through their inner tensors), every
module's training flag, hook dicts (keys and the hook functions) and other attributes (gradient-checkpointing flags,
input-gradient hooks ...), the config, and the attention implementation of every config (which ``to_dict`` leaves
out).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

_STRUCTURE = ("_parameters", "_buffers", "_modules")


def raw_bytes(tensor: torch.Tensor) -> Any:
    """The tensor's bits (a uint8 copy), or a dict of them for a wrapper subclass (its inner tensors)."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    flatten = getattr(type(data), "__tensor_flatten__", None)
    if flatten is not None and type(data) not in (torch.Tensor, nn.Parameter):
        names, _ = data.__tensor_flatten__()
        return {name: raw_bytes(getattr(data, name)) for name in names}
    if data.device.type == "meta":  # no data to compare (dtype, shape and device are compared elsewhere)
        return torch.empty(0, dtype=torch.uint8)
    plain = data.detach().cpu().contiguous().reshape(-1)
    return plain.view(torch.uint8).clone() if plain.numel() else plain.clone()


def same_bytes(a: Any, b: Any) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same_bytes(a[k], b[k]) for k in a)
        )
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _freeze(value: Any, depth: int = 0) -> Any:
    """A comparable copy of a Parameter subclass's own attributes (bitsandbytes' quant_state and the like)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), raw_bytes(value))
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device)):
        return value
    if depth > 3 or isinstance(value, (nn.Module, type)):
        return ("object", id(value))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v, depth + 1) for k, v in value.items()}
    if hasattr(value, "__dict__"):
        return (type(value).__name__, _freeze(vars(value), depth + 1))
    return ("object", id(value))


def _same_frozen(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and len(a) == 4 and a[0] == "tensor":
        return isinstance(b, tuple) and len(b) == 4 and a[:3] == b[:3] and same_bytes(a[3], b[3])
    if isinstance(a, (list, tuple)):
        same_length = isinstance(b, type(a)) and len(a) == len(b)
        return same_length and all(_same_frozen(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_frozen(a[k], b[k]) for k in a)
    return a == b


def _tensor_record(tensor: torch.Tensor) -> dict[str, Any]:
    extra = _freeze(vars(tensor)) if type(tensor) not in (torch.Tensor, nn.Parameter) else {}
    return {
        "extra": extra,
        "id": id(tensor),
        "type": type(tensor).__name__,
        "data_type": type(tensor.data).__name__ if isinstance(tensor, nn.Parameter) else type(tensor).__name__,
        "dtype": tensor.dtype,
        "shape": tuple(tensor.shape),
        "device": str(tensor.device),
        "requires_grad": tensor.requires_grad,
        "bytes": raw_bytes(tensor),
    }


def _attribute_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device)):
        return ("value", value)
    if isinstance(value, dict) and all(isinstance(k, (int, str)) for k in value):  # hook dicts and the like
        return ("dict", {k: id(v) for k, v in value.items()})
    return ("object", id(value))


@dataclasses.dataclass
class ModelState:
    params: dict[str, dict[str, Any]]
    buffers: dict[str, dict[str, Any]]
    modules: dict[str, dict[str, Any]]
    config: Any
    attributes: dict[str, Any]

    def diff(self, other: ModelState) -> list[str]:
        """Human lines, one per difference (empty: identical)."""
        out: list[str] = []
        for kind in ("params", "buffers"):
            mine, theirs = getattr(self, kind), getattr(other, kind)
            if mine.keys() != theirs.keys():
                out.append(f"{kind} names differ: {sorted(mine.keys() ^ theirs.keys())[:5]}")
            for name in mine.keys() & theirs.keys():
                a, b = mine[name], theirs[name]
                for field in ("id", "type", "data_type", "dtype", "shape", "device", "requires_grad"):
                    if a[field] != b[field]:
                        out.append(f"{kind[:-1]} {name}: {field} {a[field]} -> {b[field]}")
                if a["dtype"] == b["dtype"] and not same_bytes(a["bytes"], b["bytes"]):
                    out.append(f"{kind[:-1]} {name}: values changed")
                if not _same_frozen(a["extra"], b["extra"]):
                    out.append(f"{kind[:-1]} {name}: attributes (e.g. quant_state) changed")
        if self.modules.keys() != other.modules.keys():
            out.append(f"module names differ: {sorted(self.modules.keys() ^ other.modules.keys())[:5]}")
        for name in self.modules.keys() & other.modules.keys():
            a, b = self.modules[name], other.modules[name]
            for attr in sorted(a.keys() | b.keys()):
                if a.get(attr, "<missing>") != b.get(attr, "<missing>"):
                    out.append(
                        f"module {name or '<root>'}: {attr} {a.get(attr, '<missing>')} -> {b.get(attr, '<missing>')}"
                    )
        if self.config != other.config:
            changed = {
                k for k in self.config.keys() | other.config.keys() if self.config.get(k) != other.config.get(k)
            }
            out.append(f"config changed: {sorted(changed)}")
        if self.attributes != other.attributes:
            out.append(f"model attributes changed: {self.attributes} -> {other.attributes}")
        return out


def attention_implementations(model: nn.Module) -> dict[str, Any]:
    """The attention attributes ``set_attn_implementation`` writes, for every config of every module and its
    sub-configs, by where the config was found."""
    found: dict[int, tuple[str, Any]] = {}
    stack = [(f"{name or '<root>'}.config", m.config) for name, m in model.named_modules() if hasattr(m, "config")]
    while stack:
        where, config = stack.pop()
        if id(config) in found or not hasattr(config, "_attn_implementation"):
            continue
        found[id(config)] = (where, config)
        for key in getattr(config, "sub_configs", None) or {}:
            stack.append((f"{where}.{key}", getattr(config, key, None)))
    return {
        where: (
            config.__dict__.get("_attn_implementation_internal", "<missing>"),
            "_attn_was_changed" in config.__dict__,
        )
        for where, config in found.values()
    }


def take(model: nn.Module) -> ModelState:
    params = {n: _tensor_record(p) for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {n: _tensor_record(b) for n, b in model.named_buffers(remove_duplicate=False)}
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        record = {k: _attribute_value(v) for k, v in module.__dict__.items() if k not in _STRUCTURE}
        modules[name] = record
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    attributes = {
        "portable_kbit_state": id(getattr(model, "_portable_kbit_state", None)),
        "attention": attention_implementations(model),
    }
    return ModelState(params, buffers, modules, config_dict, attributes)


def hook_count(model: nn.Module) -> int:
    """Every forward/backward hook on every module (duplicates would show here)."""
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    return sum(len(getattr(m, n, {})) for m in model.modules() for n in names)


def assert_unchanged(before: ModelState, model: nn.Module, context: str = "") -> None:
    differences = before.diff(take(model))
    assert not differences, f"{context}: the model changed:\n  " + "\n  ".join(differences[:30])
