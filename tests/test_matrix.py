"""The matrix: architecture x quantizer x activations, on every backend available here.

Each cell loads a tiny random model of the architecture through the real quantizer, prepares it with the
architecture's LoRA targets, attaches LoRA and runs forward and backward twice (one optimizer step between):
the loss is finite, every adapter matrix gets a finite, non-zero gradient, the quantized weights keep their exact
bits, the adjacent norms are fp32 and hand on the dtype `activations` asks for. A cell is skipped only where the
quantizer cannot run here, and the skip message says why.
"""

from __future__ import annotations

import importlib.util
import math

import model_state
import pytest
import torch
from conftest import bitsandbytes_supports
from peft import LoraConfig, get_peft_model

import portable_kbit
from portable_kbit.model.quantized import quantization_kind
from portable_kbit.tools import tiny

# tiny.QUANTIZERS (bitsandbytes nf4/fp4/8-bit, optimum-quanto int8/int4/float8, and "none": a plain bf16 model),
# plus the weight-only quantizers that load through transformers where their package installs.
EXTRA_QUANTIZERS = ("torchao-int8", "torchao-int4", "hqq-4bit")
QUANTIZERS = tuple(tiny.QUANTIZERS) + EXTRA_QUANTIZERS
ACTIVATIONS = ("fp32", "mixed", "layer", "native")

# what portable_kbit.report() calls each quantizer's weights
REPORTED = {
    "bnb-nf4": "bitsandbytes-4bit",
    "bnb-fp4": "bitsandbytes-4bit",
    "bnb-8bit": "bitsandbytes-8bit",
    "quanto-int8": "optimum-quanto",
    "quanto-int4": "optimum-quanto",
    "quanto-float8": "optimum-quanto",
    "torchao-int8": "torchao",
    "torchao-int4": "torchao",
    "hqq-4bit": "unknown integer weight (uint8)",  # not recognised by type: treated as quantized, and said so
}


# optimum-quanto, torchao and HQQ quantize nn.Linear only: GPT-2's Conv1D layers stay bf16 and transformers keeps
# lm_head unquantized, so these cells run prepare() and LoRA on an unquantized GPT-2 (still a valid cell: nothing is
# skipped).
LINEAR_ONLY_MISSES = ("gpt2",)


def why_not_here(quantizer: str, backend: str) -> str | None:
    """None if the cell can run on this backend; else the reason, for the skip message."""
    if quantizer.startswith("bnb-") and not bitsandbytes_supports(backend):
        return f"bitsandbytes has no {backend} backend in the versions tested"
    if quantizer.startswith("torchao-"):
        if importlib.util.find_spec("torchao") is None:
            return "torchao is not installed (pip install torchao; it is in the 'test' extra)"
        if quantizer == "torchao-int4":
            if backend == "cpu":
                return (
                    "torchao int4 weight-only has no CPU path (torchao 0.18: the 'plain' packing needs the mslk>=1.0 "
                    "CUDA kernels, 'plain_int32' raises 'does not support device cpu', 'opaque' is refused by "
                    "Int4WeightOnlyConfig)"
                )
            if importlib.util.find_spec("mslk") is None:
                return "torchao int4 weight-only needs the mslk>=1.0 kernels, not installed here"
    if quantizer == "hqq-4bit":
        if importlib.util.find_spec("hqq") is None:
            return "hqq is not installed (pip install hqq; it is in the 'test' extra)"
    return None


def hqq_quantize(model, device: str):
    """HQQ 4-bit through hqq's own API: transformers 5.x cannot load HQQ models (its HqqHfQuantizer raises
    NotImplementedError 'QuantizationMethod.HQQ is not available yet') and hqq's AutoHQQHFModel knows only
    Llama-style layouts, so every nn.Linear but lm_head becomes an HQQLinear here, as both of them would do."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=4, group_size=64)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, torch.nn.Linear) and full != "lm_head":
                setattr(parent, name, HQQLinear(child, config, compute_dtype=torch.bfloat16, device=device))
    return model


def load(arch: str, quantizer: str, device: str):
    if quantizer in tiny.QUANTIZERS:
        return tiny.load(tiny.checkpoint(arch), quantizer, device)
    from transformers import AutoModelForCausalLM

    if quantizer.startswith("torchao-"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        weights = Int8WeightOnlyConfig() if quantizer == "torchao-int8" else Int4WeightOnlyConfig(group_size=64)
        config = TorchAoConfig(weights)
    else:
        return hqq_quantize(tiny.load(tiny.checkpoint(arch), "none", device), device)
    kwargs = {"dtype": torch.bfloat16, "quantization_config": config}
    if device != "cpu":
        kwargs["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(tiny.checkpoint(arch), **kwargs)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n}


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_cell(backend, device, arch, quantizer, activations):
    reason = why_not_here(quantizer, backend)
    if reason is not None:
        pytest.skip(reason)
    targets = tiny.LORA_TARGETS[arch]
    model = load(arch, quantizer, device)
    quantized = {n: p for n, p in model.named_parameters() if quantization_kind(p) is not None}
    if quantizer == "none":
        assert not quantized
    elif not (arch in LINEAR_ONLY_MISSES and quantizer.split("-")[0] in ("quanto", "torchao", "hqq")):
        assert quantized, f"{quantizer} quantized nothing"
    bits = {n: model_state.raw_bytes(p) for n, p in quantized.items()}
    dtypes = {n: p.dtype for n, p in model.named_parameters()}

    assert portable_kbit.prepare(model, device, target_modules=targets, activations=activations) is model
    report = portable_kbit.report(model)
    assert report.skipped_quantized == len(quantized)
    assert report.quantizers == ({REPORTED[quantizer]: len(quantized)} if quantized else {})
    assert report.upcast_norms, f"no norm found next to {targets}: {report.notes}"
    # the default computes the frozen norms in fp32 at call time: no parameter changes dtype
    assert report.fp32_compute_norms == report.upcast_norms and report.upcast == []
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes

    # the flow: an upcast norm hands on fp32 ("fp32", "mixed", "layer") or the model's dtype ("native")
    seen: list[torch.dtype] = []
    probe = model.get_submodule(report.upcast_norms[0]).register_forward_hook(
        lambda module, args, output: seen.append((output[0] if isinstance(output, tuple) else output).dtype)
    )

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    peft_model.train()
    ids = tiny.batch(256, 32, 1, device)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(2):
        loss = peft_model(input_ids=ids, labels=ids).loss
        losses.append(float(loss))
        assert math.isfinite(losses[-1]), f"step {step}: loss {losses[-1]}"
        loss.backward()
        grads = lora_grads(peft_model)
        assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values()), step
        # lora_B starts at zero, so lora_A's first gradient is zero: every lora_B from the first step, every
        # lora_A after one optimizer step
        must_be_nonzero = [n for n in grads if "lora_B" in n or step > 0]
        zero = [n for n in must_be_nonzero if not bool(grads[n].abs().sum() > 0)]
        assert not zero, f"step {step}: zero adapter gradients: {zero[:4]}"
        optimizer.step()
        optimizer.zero_grad()
    probe.remove()
    expected = torch.float32 if activations in ("fp32", "mixed", "layer") else torch.bfloat16
    assert seen and set(seen) == {expected}, (activations, seen)

    for name, p in quantized.items():  # never touched: the same bits after prepare() and two training steps
        assert model_state.same_bytes(model_state.raw_bytes(p), bits[name]), f"quantized weight {name} changed"
