"""Attention over blocks of queries (patches/query_blocks.py) and where prepare() uses it: the same output and
gradients as torch's attention, far less memory than the math kernel, and on a device whose training attention has
no fused kernel (Apple MPS, stood in for on the CPU) every long call runs on it, in every activations mode."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_llama import tiny_llama
from torch.nn.attention import SDPBackend, sdpa_kernel

import portable_kbit
from portable_kbit.backends import base as backend_base
from portable_kbit.backends.cpu import CpuBackend
from portable_kbit.backends.mps import MpsBackend
from portable_kbit.memory.livebytes import LiveTensorBytes
from portable_kbit.patches import attention_call
from portable_kbit.patches.query_blocks import block_rows, query_block_attention

TOLERANCE = 2e-5


def reference(query, key, value, mask, causal):
    """torch's math kernel, fully masked rows as zeros (the fused kernels' answer, and ours)."""
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=causal, enable_gqa=query.shape[1] != key.shape[1]
        )
    return torch.nan_to_num(out)


def mask_of(kind: str, batch: int, heads: int, length: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "padding":  # row 0 left-padded: its first queries see no key at all
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
        mask[0, :, :, : length // 4] = False
        return mask
    generator = torch.Generator().manual_seed(3)
    return torch.randn(batch, heads, length, length, generator=generator)  # an additive bias per head


CASES = {
    "causal": (2, 4, 4, "none", True),
    "causal, grouped-query": (2, 8, 2, "none", True),
    "padding mask, grouped-query": (2, 8, 2, "padding", False),
    "additive mask per head": (1, 4, 1, "bias", False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows", [16, 64])
def test_same_output_and_gradients_as_torch(case, rows):
    batch, heads, kv_heads, mask_kind, causal = CASES[case]
    generator = torch.Generator().manual_seed(0)
    length, width = 70, 16  # not a multiple of the block: the last block is short

    def tensor(h):
        return torch.randn(batch, h, length, width, generator=generator).requires_grad_()

    query, key, value = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    mask = mask_of(mask_kind, batch, heads, length)
    grad = torch.randn(batch, heads, length, width, generator=generator)
    ours = query_block_attention(query, key, value, mask, is_causal=causal, rows=rows)
    ours.backward(grad)
    ours_grads = [t.grad.clone() for t in (query, key, value)]
    for t in (query, key, value):
        t.grad = None
    expected = reference(query, key, value, mask, causal)
    expected.backward(grad)
    assert (ours - expected).abs().max() <= TOLERANCE
    for name, mine, theirs in zip("qkv", ours_grads, (query.grad, key.grad, value.grad), strict=True):
        assert (mine - theirs).abs().max() <= TOLERANCE, name


def attention_bytes(path: str, length: int) -> int:
    """Peak bytes of live tensors one forward and backward adds to its inputs (bf16, 4 heads sharing 1, width 64)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, length, 64, generator=generator).bfloat16().requires_grad_()
    key = torch.randn(1, 1, length, 64, generator=generator).bfloat16().requires_grad_()
    value = torch.randn(1, 1, length, 64, generator=generator).bfloat16().requires_grad_()
    grad = torch.randn(1, 4, length, 64, generator=generator).bfloat16()
    tracker = LiveTensorBytes(torch.device("cpu"))
    for tensor in (query, key, value, grad):
        tracker.adopt(tensor)
    with tracker:
        if path == "query blocks":
            out = query_block_attention(query, key, value, is_causal=True)
        else:
            backend = SDPBackend.MATH if path == "math" else SDPBackend.FLASH_ATTENTION
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(
                    query, key, value, is_causal=True, enable_gqa=True
                )
        out.backward(grad)
    return tracker.peak_bytes - tracker.static_bytes


def test_memory_stays_near_the_fused_kernels_and_far_below_the_math_kernels():
    length = 2048
    fused, math_kernel, blocks = (attention_bytes(p, length) for p in ("fused", "math", "query blocks"))
    assert blocks <= 2 * fused, (blocks, fused)  # the target: within 2x of the fused kernel's
    assert blocks * 10 <= math_kernel, (blocks, math_kernel)  # the math kernel keeps [heads, L, L] scores


@pytest.mark.parametrize("rows", [64, 128])
def test_a_block_holds_about_two_fp32_score_blocks_at_a_time(rows):
    """Beyond what a call must keep (its output, the row log-sum-exps, the query gradient and the fp32 key/value
    gradient accumulators), the peak is about two fp32 [query heads x rows, keys] tensors: a block's probabilities are
    made in its scores' memory and freed before the next block makes its own (4.7 of them before 2026-12-07)."""
    length, heads, width = 2048, 4, 64
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, length, width, generator=generator).bfloat16().requires_grad_()
    key = torch.randn(1, 1, length, width, generator=generator).bfloat16().requires_grad_()
    value = torch.randn(1, 1, length, width, generator=generator).bfloat16().requires_grad_()
    grad = torch.randn(1, heads, length, width, generator=generator).bfloat16()
    tracker = LiveTensorBytes(torch.device("cpu"))
    for tensor in (query, key, value, grad):
        tracker.adopt(tensor)
    with tracker:
        query_block_attention(query, key, value, is_causal=True, rows=rows).backward(grad)
    kept = 2 * query.numel() * 2 + heads * length * 4 + 2 * key.numel() * 4  # out, grad_q; lse; fp32 grad k, v
    block = heads * rows * length * 4
    assert tracker.peak_bytes - tracker.static_bytes <= kept + 2.25 * block, (tracker.peak_bytes, kept, block)


def test_block_rows_are_a_power_of_two_sized_to_the_query():
    for length, width, dtype in ((8192, 128, torch.bfloat16), (8192, 128, torch.float32), (100, 16, torch.float32)):
        query = torch.empty(1, 8, length, width, dtype=dtype, device="meta")
        rows = block_rows(query, query)
        assert rows & (rows - 1) == 0 and 16 <= rows <= max(16, length)
        assert 3 * 8 * rows * length * 4 <= max(2 * query.numel() * query.element_size(), 3 * 8 * 16 * length * 4)
    bf16 = block_rows(torch.empty(1, 8, 8192, 128, dtype=torch.bfloat16, device="meta"), torch.empty(0, 2, 8192))
    fp32 = block_rows(torch.empty(1, 8, 8192, 128, dtype=torch.float32, device="meta"), torch.empty(0, 2, 8192))
    assert fp32 == 2 * bf16  # an fp32 query is twice the bytes: twice the rows


# ---- where prepare() uses it ----------------------------------------------------------------------------------------


def llama(**overrides):
    return tiny_llama(**overrides)


@pytest.fixture
def mps_standin(monkeypatch):
    """The CPU backend with MPS's attention facts: no fused training attention (every long call runs over blocks of
    queries), and 'long' from 32 query rows so that the test sequences are long."""
    monkeypatch.setattr(CpuBackend, "attention_holds_scores", MpsBackend.attention_holds_scores)
    monkeypatch.setattr(CpuBackend, "long_attention", lambda self, *args: backend_base.QUERY_BLOCKS)
    monkeypatch.setattr(CpuBackend, "query_blocks_from", 32)


def train_step(model, inputs, activations):
    """prepare(), random LoRA weights (the same each time), one forward and backward: (loss, adapter grads, model)."""
    portable_kbit.prepare(
        model,
        target_modules=["q_proj", "v_proj"],
        activations=activations,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    torch.manual_seed(5)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    out = model(**inputs)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, model


def batch():
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("activations", ["fp32", "mixed", "layer", "native"])
def test_on_the_mps_standin_every_mode_runs_long_calls_over_query_blocks(mps_standin, activations):
    _, _, model = train_step(llama(), batch(), activations)
    report = portable_kbit.report(model.get_base_model())
    assert report.attention == "portable_kbit_sdpa" and "math kernel" in report.attention_reason
    calls = report.attention_calls.to_dict()
    # two layers, a forward and the recompute of each in backward
    assert calls["paths"] == {"query blocks": 4} and calls["kept_sdpa"] == {}, calls
    assert "query blocks: 4" in report.summary()


@pytest.mark.parametrize("activations", ["fp32", "native"])
def test_query_blocks_give_the_loss_and_gradients_of_transformers_sdpa(monkeypatch, activations):
    base = llama()
    plain = train_step(copy.deepcopy(base), batch(), activations)  # the CPU's fused kernel
    monkeypatch.setattr(CpuBackend, "attention_holds_scores", MpsBackend.attention_holds_scores)
    monkeypatch.setattr(CpuBackend, "long_attention", lambda self, *args: backend_base.QUERY_BLOCKS)
    monkeypatch.setattr(CpuBackend, "query_blocks_from", 32)
    blocked = train_step(copy.deepcopy(base), batch(), activations)
    assert portable_kbit.report(blocked[2].get_base_model()).attention_calls.paths["query blocks"] == 4
    assert math.isclose(plain[0], blocked[0], abs_tol=1e-5), (plain[0], blocked[0])
    assert max((plain[1][n] - blocked[1][n]).abs().max().item() for n in plain[1]) <= 1e-4


def test_a_call_the_fused_kernels_refuse_runs_over_query_blocks_on_any_backend(monkeypatch):
    """CPU and CUDA ask torch's dispatcher: a long call it would give the math kernel runs over query blocks."""
    monkeypatch.setattr(backend_base, "sdpa_kernel_choice", lambda *args, **kwargs: "MATH")
    query = torch.randn(1, 4, 1024, 16)
    key = torch.randn(1, 2, 1024, 16)

    class Attention(torch.nn.Module):
        num_key_value_groups = 2
        is_causal = True

    path, kept = attention_call.path_of(Attention(), query, key, key, None, 0.0, None)
    assert (path, kept) == ("query blocks", None)
    short = attention_call.path_of(Attention(), query[:, :, :64], key[:, :, :64], key[:, :, :64], None, 0.0, None)
    assert short == ("sdpa", None)  # a short call keeps the math kernel: its scores are small
    monkeypatch.setattr(backend_base, "sdpa_kernel_choice", lambda *args, **kwargs: "FLASH_ATTENTION")
    assert attention_call.path_of(Attention(), query, key, key, None, 0.0, None) == ("sdpa", None)


def test_dropout_while_training_keeps_transformers_call_and_says_why(monkeypatch):
    monkeypatch.setattr(CpuBackend, "long_attention", lambda self, *args: backend_base.QUERY_BLOCKS)
    query, key = torch.randn(1, 4, 1024, 16), torch.randn(1, 4, 1024, 16)
    module = torch.nn.Module()
    with torch.enable_grad():
        path, kept = attention_call.path_of(module, query, key, key, None, 0.1, None)
    assert path == "sdpa" and "dropout" in kept
    with torch.no_grad():  # no training: dropout is off in transformers' call anyway
        assert attention_call.path_of(module, query, key, key, None, 0.0, None) == ("query blocks", None)


@pytest.mark.parametrize("trains", [True, False])
def test_mps_asks_a_probe_not_a_version(monkeypatch, trains):
    from portable_kbit.backends import mps as mps_module

    probed = []

    def probe(device, dtype):
        probed.append(dtype)
        return trains

    monkeypatch.setattr(mps_module, "probe_efficient_attention", probe)
    backend = MpsBackend()
    q = torch.empty(1, 4, 8, 16, dtype=torch.bfloat16)
    expected = backend_base.MEMORY_EFFICIENT_KERNEL if trains else backend_base.QUERY_BLOCKS
    assert backend.long_attention(q, q, q, None, 0.0, True, False) == expected
    assert backend.long_attention(q, q, q, None, 0.0, True, False) == expected
    assert probed == [torch.bfloat16]  # once per dtype
    assert backend.attention_holds_scores(torch.device("mps"))
