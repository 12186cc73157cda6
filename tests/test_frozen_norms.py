"""Frozen norms computed in fp32 at call time (frozen_norms="compute", the default) against their parameters cast to
fp32 (frozen_norms="upcast", version 0.1): the same numbers, bit for bit, with no parameter changing dtype.

Norms of several kinds: Llama's RMSNorm (weight * x), Gemma's (x * (1 + weight), computed in fp32 by the model
itself), GPT-2's and OPT's nn.LayerNorm with a bias. Found by behaviour: the parameters are swapped for one call,
whatever the norm's forward does with them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import bitsandbytes_supports
from safetensors import safe_open

import portable_kbit
from portable_kbit.tools import tiny

ARCHS = ("llama", "gemma", "gpt2", "opt")


def load(arch: str, backend: str, device: str):
    if not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes 4-bit does not run on {backend}")
    return tiny.load(tiny.checkpoint(arch), "bnb-nf4", device)


@pytest.mark.parametrize("activations", ["fp32", "mixed", "layer", "native"])
@pytest.mark.parametrize("arch", ARCHS)
def test_compute_and_upcast_train_bit_for_bit_alike(backend, device, arch, activations):
    targets = tiny.LORA_TARGETS[arch]
    losses = {}
    for frozen_norms in ("compute", "upcast"):
        model = load(arch, backend, device)
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        portable_kbit.prepare(
            model, device, target_modules=targets, activations=activations, frozen_norms=frozen_norms
        )
        report = portable_kbit.report(model)
        assert report.upcast_norms
        if frozen_norms == "compute":
            assert report.fp32_compute_norms == report.upcast_norms and report.upcast == []
            assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
        else:
            assert report.fp32_compute_norms == [] and report.upcast
        torch.manual_seed(0)
        losses[frozen_norms] = tiny.train_lora(model, targets, steps=3)[1]
    assert losses["compute"] == losses["upcast"], losses


def test_norm_output_is_the_fp32_computation(backend, device):
    """The norm's output under "compute" is what it gives with fp32 copies of its weight and bias and an fp32 input
    (GPT-2's nn.LayerNorm: with a bf16 weight and an fp32 input its kernel would refuse the call)."""
    model = load("gpt2", backend, device)
    norm = model.transformer.h[0].ln_1
    reference = torch.nn.LayerNorm(norm.normalized_shape, eps=norm.eps).to(device)
    with torch.no_grad():
        reference.weight.copy_(norm.weight.float())
        reference.bias.copy_(norm.bias.float())
    portable_kbit.prepare(model, device, target_modules=tiny.LORA_TARGETS["gpt2"], activations="fp32")
    assert "transformer.h.0.ln_1" in portable_kbit.report(model).fp32_compute_norms
    x = torch.randn(1, 4, *norm.normalized_shape, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        assert torch.equal(norm(x), reference(x.float()))
    assert norm.weight.dtype == norm.bias.dtype == torch.bfloat16  # swapped back after the call


class RoundsToItsWeight(torch.nn.Module):
    """A norm that casts its input to its weight's dtype (T5's LayerNorm does for half-precision weights)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width, dtype=torch.bfloat16) * 1.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x.to(self.weight.dtype)


def test_parameters_read_as_fp32_inside_the_call_only():
    from portable_kbit.patches.fp32_compute import parameters_in_fp32

    norm = RoundsToItsWeight(8)
    x = torch.full((8,), 1 / 3, dtype=torch.float32)
    with parameters_in_fp32(norm, ["weight"]):
        inside = norm(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, norm.weight.float() * x)  # x not rounded to bf16
    assert isinstance(norm.weight, torch.nn.Parameter) and norm.weight.dtype == torch.bfloat16
    assert norm(x).dtype == torch.bfloat16


def test_a_failing_norm_forward_leaves_its_parameters_alone(backend, device):
    model = load("llama", backend, device)
    portable_kbit.prepare(model, device, target_modules=tiny.LORA_TARGETS["llama"])
    norm = model.model.layers[0].input_layernorm
    weight = norm.weight
    with pytest.raises(RuntimeError):
        norm(torch.zeros(1, 2, 3, device=device))  # the wrong width
    assert norm.weight is weight and norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("activations", ["fp32", "mixed", "layer", "native"])
def test_save_pretrained_writes_the_dtypes_the_model_was_loaded_with(backend, device, activations, tmp_path):
    model = load("llama", backend, device)
    with safe_open(os.path.join(tiny.checkpoint("llama"), "model.safetensors"), "pt") as original:
        loaded = {name: original.get_slice(name).get_dtype() for name in original.keys()}
    portable_kbit.prepare(model, device, target_modules=tiny.LORA_TARGETS["llama"], activations=activations)
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as saved:
        norms = {name: saved.get_slice(name).get_dtype() for name in saved.keys() if "norm" in name}
    assert norms and all(loaded[name] == dtype for name, dtype in norms.items()), (norms, loaded)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
