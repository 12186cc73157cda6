"""lm_head's fp32 products from bf16 matmuls that write fp32 (patches/fp32_compute.py): the split is exact, the
blocked forward and backward equal the upcast path's, and where the backend takes this path a prepared step trains
as with fp32 matmuls."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_llama import tiny_llama

import portable_kbit
from portable_kbit import backends
from portable_kbit.backends.cuda import CudaBackend
from portable_kbit.backends.rocm import RocmBackend
from portable_kbit.patches import fp32_compute
from portable_kbit.patches.fp32_compute import FrozenLinearInFp32, bf16_parts

TARGETS = ["q_proj", "v_proj"]


@pytest.mark.parametrize("scale", [1e-20, 1e-3, 1.0, 1e4, 1e30])
def test_the_three_bf16_parts_sum_to_the_fp32_value_exactly(scale):
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * scale
    parts = bf16_parts(x)
    assert [p.dtype for p in parts] == [torch.bfloat16] * 3
    assert torch.equal(sum(p.double() for p in parts), x.double())
    low, middle, high = (p.float().abs() for p in parts)
    assert (low <= middle).all() and (middle <= high).all()  # smallest first: added first


REAL_MM = torch.mm


def matmul_as_the_device_does(a, b, out_dtype=None):
    """torch.mm(bf16, bf16, out_dtype=fp32) as CUDA computes it: exact products, fp32 sums (the CPU has no kernel);
    any other call goes to torch.mm."""
    if out_dtype is None:
        return REAL_MM(a, b)
    assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
    return a.float() @ b.float()


@pytest.mark.parametrize("rows", [5, 64])
def test_blocks_from_bf16_parts_equal_the_upcast_blocks(monkeypatch, rows):
    """Forward and backward of FrozenLinearInFp32 both ways, with the device's matmul stood in on the CPU: the same
    logits and input gradients up to fp32 rounding (a 3-D input, a bias, row blocks that do not divide the rows)."""
    monkeypatch.setattr(torch, "mm", matmul_as_the_device_does)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(37, 48, generator=generator).to(torch.bfloat16)
    bias = torch.randn(37, generator=generator).to(torch.bfloat16)
    x = torch.randn(2, 9, 48, generator=generator)
    grad = torch.randn(2, 9, 37, generator=generator)
    results = []
    for from_parts in (False, True):
        leaf = x.clone().requires_grad_()
        out = FrozenLinearInFp32.apply(leaf, weight, bias, rows, from_parts)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    (out, grad_x), (out_parts, grad_parts) = results
    assert out_parts.dtype == torch.float32 and grad_parts.dtype == torch.float32
    torch.testing.assert_close(out_parts, out, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_parts, grad_x, rtol=1e-6, atol=1e-5)
    # and not the product of the input rounded to bf16 (what a plain bf16 matmul would give)
    rounded = torch.nn.functional.linear(x.to(torch.bfloat16).float(), weight.float(), bias.float())
    assert (rounded - out).abs().max() > 100 * (out_parts - out).abs().max()


def test_the_cuda_backend_asks_the_device_and_rocm_and_the_cpu_say_why_not(monkeypatch):
    backend = CudaBackend()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 0))
    assert "has no bf16 tensor cores" in backend.why_no_fp32_from_bf16(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 7))
    asked = []
    monkeypatch.setattr("portable_kbit.backends.cuda.bf16_matmul_writes_fp32", lambda index: asked.append(index))
    assert backend.why_no_fp32_from_bf16(torch.device("cuda:0")) is None and asked == [0]

    def no_cuda(index=None):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_cuda)  # a stand-in device: a reason, not an error
    assert "compute capability unknown" in backend.why_no_fp32_from_bf16(torch.device("cuda:0"))
    assert "not measured" in RocmBackend().why_no_fp32_from_bf16(torch.device("cuda:0"))
    assert "not measured" in backends.resolve("cpu").backend.why_no_fp32_from_bf16(torch.device("cpu"))


def prepared_step(device: str, from_parts: bool, monkeypatch) -> tuple[float, dict[str, torch.Tensor], int]:
    """A bf16 tiny Llama prepared in fp32 mode, its lm_head from bf16 parts or upcast blocks; one LoRA step."""
    target = backends.resolve(device)
    verdict = None if from_parts else "off for this comparison"
    monkeypatch.setattr(type(target.backend), "why_no_fp32_from_bf16", lambda self, device: verdict)
    calls = []
    real = fp32_compute.matmul_from_bf16_parts
    monkeypatch.setattr(fp32_compute, "matmul_from_bf16_parts", lambda *a: calls.append(1) or real(*a))
    model = tiny_llama(torch.bfloat16).to(device)
    portable_kbit.prepare(model, target_modules=TARGETS, activations="fp32")
    torch.manual_seed(5)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)
    head = portable_kbit.report(model).fp32_head  # this bf16 model's frozen projections compute in fp32 as lm_head
    assert head.startswith("15 linear layers (lm_head, ") and ("three bf16 matmuls" in head) == from_parts, head
    assert ("(off for this comparison)" in head) != from_parts
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls)


def test_a_prepared_step_from_bf16_parts_trains_as_with_fp32_matmuls(backend, device, monkeypatch):
    """lm_head takes the path in the forward and the backward, and the loss and the adapters' gradients are those of
    fp32 matmuls up to rounding. On a device whose backend takes the path (CUDA from Ampere, torch 2.8+) with its
    own matmuls; elsewhere with the device's matmul stood in."""
    target = backends.resolve(device)
    if target.backend.why_no_fp32_from_bf16(target.device) is not None:
        monkeypatch.setattr(torch, "mm", matmul_as_the_device_does)
    loss, grads, none = prepared_step(device, False, monkeypatch)
    parts_loss, parts_grads, calls = prepared_step(device, True, monkeypatch)
    assert none == 0 and calls >= 2  # the forward's blocks and the backward's
    assert abs(parts_loss - loss) < 1e-5
    for name, grad in grads.items():
        torch.testing.assert_close(parts_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_an_fp16_head_keeps_the_upcast_blocks_and_the_report_says_why(monkeypatch):
    """fp16's exponent range is not fp32's, so fp32 values have no exact fp16 parts: an fp16 model computes from
    upcast blocks even where the backend's bf16 matmuls write fp32, and the report names the weight's dtype."""
    monkeypatch.setattr(type(backends.resolve("cpu").backend), "why_no_fp32_from_bf16", lambda self, device: None)
    calls = []
    real = fp32_compute.matmul_from_bf16_parts
    monkeypatch.setattr(fp32_compute, "matmul_from_bf16_parts", lambda *a: calls.append(1) or real(*a))
    model = tiny_llama(torch.float16)
    portable_kbit.prepare(model, target_modules=TARGETS, activations="fp32")
    head = portable_kbit.report(model).fp32_head
    assert "fp32 matmuls over upcast blocks of the weight (its weight is torch.float16)" in head, head
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32 and calls == []
