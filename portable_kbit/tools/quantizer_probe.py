"""Which weight quantizers work here: a quick functional probe, and the one the demo and `compare` pick by default.

A probe quantizes one 64x64 linear layer on the device and runs a forward and a backward pass through it (what
LoRA training needs from a frozen quantized layer). It imports the quantizer's package, so the first probe of each
family costs a few seconds; the layer itself takes milliseconds.
"""

from __future__ import annotations

import importlib.util

import torch

from .. import backends
from ..backends import Backend

#: quantizers the probe knows (the names of portable_kbit.tools.tiny.QUANTIZERS, without "none")
PROBED = ("bnb-nf4", "bnb-fp4", "bnb-8bit", "quanto-int4", "quanto-int8", "quanto-float8")

#: the order tried for a backend name that is not registered (each Backend says its own: preferred_quantizers)
FALLBACK: tuple[str, ...] = Backend.preferred_quantizers

PACKAGES = {"bnb": "bitsandbytes", "quanto": "optimum.quanto"}


def package_of(quantizer: str) -> str:
    """The importable package a quantizer name needs ("bnb-nf4" -> "bitsandbytes")."""
    family = quantizer.split("-")[0]
    if family not in PACKAGES:
        raise ValueError(f"unknown quantizer {quantizer!r}; known: {', '.join(PROBED)}")
    return PACKAGES[family]


def installed(quantizer: str) -> bool:
    """True when the quantizer's package can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(package_of(quantizer)) is not None
    except (ImportError, ValueError):
        return False


def preference(backend_name: str) -> tuple[str, ...]:
    """The quantizers to try on a backend, best first: its Backend's ``preferred_quantizers``."""
    if backend_name not in backends.REGISTRY:
        return FALLBACK
    return backends.get(backend_name).preferred_quantizers


def probe(quantizer: str, device: str | torch.device = "cpu") -> str | None:
    """None if `quantizer` quantizes a linear layer on `device` and runs forward and backward there; else why not."""
    if not installed(quantizer):
        return f"{package_of(quantizer)} is not installed"
    device = torch.device(device)
    try:
        layer = _quantized_linear(quantizer, device)
        x = torch.randn(2, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
        out = layer(x)
        out.float().sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return "the backward pass gave no finite input gradient"
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line[:200]}"
    return None


def choose(backend_name: str, device: str | torch.device | None = None) -> str:
    """The quantizer to use on a backend: the first of its preference that works (probed on `device` when given,
    else only checked for being installed). Raises RuntimeError when none does."""
    reasons = []
    for quantizer in preference(backend_name):
        reason = (
            probe(quantizer, device)
            if device is not None
            else (None if installed(quantizer) else f"{package_of(quantizer)} is not installed")
        )
        if reason is None:
            return quantizer
        reasons.append(f"{quantizer}: {reason}")
    raise RuntimeError(
        f"no quantizer works on {backend_name}: "
        + "; ".join(reasons)
        + ". Install bitsandbytes (>= 0.50 on a Mac, built on the device on Jetson) or optimum-quanto."
    )


def _quantized_linear(quantizer: str, device: torch.device) -> torch.nn.Module:
    family, kind = quantizer.split("-", 1)
    if family == "bnb":
        import bitsandbytes as bnb

        if kind in ("nf4", "fp4"):
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type=kind)
            return layer.to(torch.bfloat16).to(device)  # Params4bit quantizes on the move to the device
        if kind == "8bit":
            return bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(device)
    if family == "quanto":
        from optimum import quanto

        weights = {"int4": quanto.qint4, "int8": quanto.qint8, "float8": quanto.qfloat8}[kind]
        model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).to(device=device, dtype=torch.bfloat16)
        quanto.quantize(model, weights=weights)
        quanto.freeze(model)
        return model
    raise ValueError(f"unknown quantizer {quantizer!r}; known: {', '.join(PROBED)}")
