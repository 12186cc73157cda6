"""Attention stays fused when the flow is fp32: prepare() switches an sdpa model to portable_kbit's attention.

- On a tiny grouped-query Llama (4 query heads, 2 k/v heads, bitsandbytes nf4), padded and unpadded batches train to
  peft's losses within 1e-3 with our attention installed; the expanded-k/v path (forced through the Backend decision)
  gives the unforced path's losses within 1e-5, and SDPA sees the expanded call.
- The switch is undone by a rollback (fault after the attention step), by a later prepare(activations="native"), and
  a repeat neither stacks nor forgets the model's own implementation. Eager (and flash) models are left alone.
- The Backend decisions: CPU asks torch's dispatcher, CUDA asks torch's fused-kernel checks with enable_gqa, MPS never.
"""

from __future__ import annotations

import importlib
import math

import benchmark_scripts
import model_state
import pytest
import torch
from conftest import bitsandbytes_supports
from peft import LoraConfig, get_peft_model
from peft_baseline import TORCHS_DEFAULT_CHECKPOINTING, prepare_with_peft

import portable_kbit
from portable_kbit.backends.base import torch_version
from portable_kbit.backends.cpu import CPU_FLASH_TAKES_FP32_GQA_FROM, CpuBackend
from portable_kbit.backends.cuda import CudaBackend
from portable_kbit.backends.mps import MpsBackend
from portable_kbit.patches import attention, attention_call
from portable_kbit.tools import tiny

prepare_module = importlib.import_module("portable_kbit.pipeline.prepare")
TARGETS = tiny.LORA_TARGETS["llama"]
OURS = attention.ATTENTION_NAME


class InjectedFault(RuntimeError):
    pass


def load(backend: str, device: str):
    if not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes does not run on {backend}")
    model = tiny.load(tiny.checkpoint("llama"), "bnb-nf4", device)
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads, "the test model must use grouped-query attention"
    assert config._attn_implementation == "sdpa"
    return model


def batch(padded: bool, device: str) -> dict:
    """Two sequences of 24 tokens; padded: the first left-padded by 7, the second right-padded by 5 (labels -100)."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (2, 24), generator=generator)
    if not padded:
        return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, -5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def train(model, inputs: dict, steps: int = 4) -> list[float]:
    """LoRA r8 on q/k/v/o (attached here unless already there), AdamW steps on one batch; returns the losses."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.item()))
    return losses


class SdpaSpy:
    """Records what each scaled_dot_product_attention call got: query heads, key heads, enable_gqa, a mask or not."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[int, int, bool, bool, torch.dtype]] = []
        original = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, *args, **kwargs):
            mask = kwargs.get("attn_mask", args[0] if args else None)
            self.calls.append(
                (query.shape[1], key.shape[1], bool(kwargs.get("enable_gqa", False)), mask is not None, query.dtype)
            )
            return original(query, key, value, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


def attention_calls(monkeypatch) -> list[bool]:
    """Each call of our attention function, as whether it took the expanded path."""
    calls: list[bool] = []
    original = attention_call.expands_kv

    def spy(*args):
        calls.append(original(*args))
        return calls[-1]

    monkeypatch.setattr(attention_call, "expands_kv", spy)
    return calls


def implementations(model) -> set:
    return {c._attn_implementation for c in attention.attention_configs(model)}


def switches(model) -> list:
    state = getattr(model, prepare_module.STATE_ATTRIBUTE)
    return state.patches.of_type(attention.AttentionImplementation)


# ---- numerics ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_fp32_attention_follows_peft_loss(backend, device, padded, monkeypatch):
    inputs = batch(padded, device)
    reference = load(backend, device)
    prepare_with_peft(reference, gradient_checkpointing_kwargs=TORCHS_DEFAULT_CHECKPOINTING)
    peft_losses = train(reference, inputs)
    if padded:  # the mask matters here: a run that ignored it would not follow peft
        unmasked = {k: v for k, v in inputs.items() if k != "attention_mask"}
        with torch.no_grad():
            assert abs(reference(**unmasked).loss.item() - reference(**inputs).loss.item()) > 1e-2

    torch.manual_seed(0)
    model = get_peft_model(
        load(backend, device), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    )
    portable_kbit.prepare(model, activations="fp32")
    report = portable_kbit.report(model)
    assert report.attention == OURS and "activations='fp32'" in report.attention_reason
    assert implementations(model.get_base_model()) == {OURS}
    calls = attention_calls(monkeypatch)
    spy = SdpaSpy(monkeypatch)
    our_losses = train(model, inputs)

    layers = model.config.num_hidden_layers
    assert len(calls) >= layers * len(our_losses), "our attention function did not run in every layer"
    assert all(dtype == torch.float32 for *_, dtype in spy.calls), "q/k/v were not fp32: nothing was tested"
    if padded:
        assert all(has_mask for *_, has_mask, _ in spy.calls), "the padding mask was lost"
    assert our_losses[-1] < our_losses[0]
    for step, (ours, theirs) in enumerate(zip(our_losses, peft_losses, strict=True), start=1):
        assert abs(ours - theirs) < 1e-3, f"step {step}: ours {ours:.5f}, peft {theirs:.5f}"


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_expanded_kv_path_gives_the_same_losses(backend, device, padded, monkeypatch):
    inputs = batch(padded, device)
    runs = {}
    for forced in (False, True):
        with monkeypatch.context() as patch:
            if forced:
                patch.setattr(CpuBackend, "fp32_attention_needs_expanded_kv", lambda self, *args: True)
                patch.setattr(CudaBackend, "fp32_attention_needs_expanded_kv", lambda self, *args: True)
            model = load(backend, device)
            portable_kbit.prepare(model, target_modules=TARGETS, activations="fp32")
            calls = attention_calls(patch)
            spy = SdpaSpy(patch)
            runs[forced] = (train(model, inputs), calls, spy.calls)
    (plain, plain_calls, plain_sdpa), (expanded, expanded_calls, expanded_sdpa) = runs[False], runs[True]
    assert expanded_calls and all(expanded_calls), "the forced runs did not take the expanded path"
    for q_heads, k_heads, gqa, _, dtype in expanded_sdpa:
        assert (k_heads, gqa, dtype) == (q_heads, False, torch.float32), "SDPA did not get the expanded call"
    assert plain_calls and plain_sdpa
    if backend == "cpu" and torch_version() >= CPU_FLASH_TAKES_FP32_GQA_FROM:  # transformers' own call, unchanged
        assert not any(plain_calls)
    for step, (a, b) in enumerate(zip(plain, expanded, strict=True), start=1):
        assert abs(a - b) < 1e-5, f"step {step}: transformers' call {a:.7f}, expanded k/v {b:.7f}"
    assert all(math.isfinite(x) for x in expanded)


def test_expanded_call_matches_the_gqa_call_on_one_attention_call(monkeypatch):
    """One call, forward and backward: the expanded path's output and gradients equal transformers' GQA call."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        num_key_value_groups = 4
        is_causal = True

    torch.manual_seed(0)
    q = torch.randn(1, 8, 40, 16, requires_grad=True)
    k = torch.randn(1, 2, 40, 16, requires_grad=True)
    v = torch.randn(1, 2, 40, 16, requires_grad=True)
    reference, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.25)
    reference.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    monkeypatch.setattr(CpuBackend, "fp32_attention_needs_expanded_kv", lambda self, *args: True)
    calls = attention_calls(monkeypatch)
    ours, _ = attention_call.attention_forward(Module(), q, k, v, None, scaling=0.25)
    assert calls == [True]
    ours.square().sum().backward()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip((q.grad, k.grad, v.grad), grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- the switch: undone by rollback and by a later prepare(), never stacked -----------------------------------------


def _fail_after(function):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        raise InjectedFault(f"injected failure after {function.__name__}: {result!r}")

    return wrapper


def test_rollback_after_the_attention_step_restores_sdpa(backend, device, monkeypatch):
    model = load(backend, device)
    before = model_state.take(model)
    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "switch_attention", _fail_after(prepare_module.switch_attention))
        with pytest.raises(InjectedFault) as raised:
            portable_kbit.prepare(model, target_modules=TARGETS, activations="fp32")
    assert any("restored" in note for note in raised.value.__notes__)
    assert implementations(model) == {"sdpa"}
    model_state.assert_unchanged(before, model, "failure after the attention step")
    portable_kbit.prepare(model, target_modules=TARGETS)  # and it still installs afterwards
    assert implementations(model) == {OURS}


def test_failed_repeat_keeps_the_first_calls_switch(backend, device, monkeypatch):
    model = load(backend, device)
    portable_kbit.prepare(model, target_modules=TARGETS)
    (first,) = switches(model)
    before = model_state.take(model)
    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "build_report", _fail_after(prepare_module.build_report))
        with pytest.raises(InjectedFault):
            portable_kbit.prepare(model, target_modules=TARGETS, upcast="peft")
    model_state.assert_unchanged(before, model, "a failed second call")
    assert first.is_live()
    portable_kbit.prepare(model, target_modules=TARGETS, activations="native")  # the first call's switch undoes
    assert implementations(model) == {"sdpa"}


def test_repeat_does_not_stack_and_native_switches_back(backend, device):
    model = load(backend, device)
    portable_kbit.prepare(model, target_modules=TARGETS)
    (first,) = switches(model)
    portable_kbit.prepare(model, target_modules=TARGETS)
    (second,) = switches(model)
    # the first call's set was removed before the second's went on: one switch, recording transformers' sdpa
    assert second is not first and second.is_live() and first not in switches(model)
    assert second.original.top() == "sdpa", "the repeat recorded our implementation as the one to restore"
    assert implementations(model) == {OURS}
    assert portable_kbit.report(model).attention == OURS

    portable_kbit.prepare(model, target_modules=TARGETS, activations="native")
    assert implementations(model) == {"sdpa"}
    assert switches(model) == []
    report = portable_kbit.report(model)
    assert report.attention == "sdpa" and "removed" in report.attention_reason
    _, losses = tiny.train_lora(model, TARGETS, steps=2)  # trains on transformers' sdpa again
    assert all(math.isfinite(x) for x in losses)


def test_a_users_later_switch_is_not_undone(backend, device):
    model = load(backend, device)
    portable_kbit.prepare(model, target_modules=TARGETS)
    model.set_attn_implementation("eager")  # the user's choice after prepare()
    portable_kbit.prepare(model, target_modules=TARGETS, activations="native")
    assert implementations(model) == {"eager"}


def test_eager_model_is_left_alone_with_a_note(backend, device):
    model = load(backend, device)
    model.set_attn_implementation("eager")
    portable_kbit.prepare(model, target_modules=TARGETS, activations="fp32")
    report = portable_kbit.report(model)
    assert implementations(model) == {"eager"} and report.attention == "eager"
    assert any("eager attention left as it is" in note for note in report.notes)
    assert switches(model) == []


def test_flash_attention_model_is_left_alone_with_a_note(backend, device):
    model = load(backend, device)
    model.config._attn_implementation_internal = "flash_attention_2"  # as loaded with it (no forward runs here)
    portable_kbit.prepare(model, target_modules=TARGETS, upcast="peft", activations="native")
    report = portable_kbit.report(model)
    assert implementations(model) == {"flash_attention_2"} and report.attention == "flash_attention_2"
    assert any("upcast='peft'" in note and "half precision" in note for note in report.notes)


def test_native_on_an_untouched_model_changes_no_attention(backend, device):
    model = load(backend, device)
    portable_kbit.prepare(model, target_modules=TARGETS, activations="native")
    report = portable_kbit.report(model)
    assert implementations(model) == {"sdpa"} and report.attention == "sdpa"
    assert "attention: sdpa" in report.summary() and report.to_dict()["attention"] == "sdpa"


# ---- the Backend decisions ---------------------------------------------------------------------------------------


def gqa_tensors(dtype=torch.float32):
    q = torch.randn(1, 8, 32, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 2, 32, 16, dtype=dtype, requires_grad=True)
    return q, k, k.detach().clone().requires_grad_()


def test_cpu_asks_torch_and_falls_back_to_the_version(monkeypatch):
    backend = CpuBackend()
    q, k, v = gqa_tensors()
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    from portable_kbit.backends import sdpa

    asked = sdpa.sdpa_kernel_choice(q, k, v, None, 0.0, True, enable_gqa=True)
    if asked is not None:  # the dispatcher's answer decides: math means expand
        assert backend.fp32_attention_needs_expanded_kv(q, k, v, None, 0.0, True) == (asked == "MATH")
        assert backend.fp32_attention_needs_expanded_kv(q, k, v, mask, 0.0, False) == (
            sdpa.sdpa_kernel_choice(q, k, v, mask, 0.0, False, enable_gqa=True) == "MATH"
        )
    cpu_module = importlib.import_module("portable_kbit.backends.cpu")
    monkeypatch.setattr(cpu_module, "sdpa_kernel_choice", lambda *args, **kwargs: "MATH")
    assert backend.fp32_attention_needs_expanded_kv(q, k, v, None, 0.0, True)
    monkeypatch.setattr(cpu_module, "sdpa_kernel_choice", lambda *args, **kwargs: None)
    monkeypatch.setattr(cpu_module, "torch_version", lambda: (2, 8))
    assert backend.fp32_attention_needs_expanded_kv(q, k, v, None, 0.0, True)
    monkeypatch.setattr(cpu_module, "torch_version", lambda: (2, 9))
    assert not backend.fp32_attention_needs_expanded_kv(q, k, v, None, 0.0, True)


def test_sdpa_kernel_choice_names_a_kernel_or_none():
    from portable_kbit.backends.sdpa import sdpa_kernel_choice

    q, k, v = gqa_tensors()
    assert sdpa_kernel_choice(q, k, v, None, 0.0, True, enable_gqa=True) in (
        None,
        "FLASH_ATTENTION",
        "EFFICIENT_ATTENTION",
        "CUDNN_ATTENTION",
        "MATH",
        "OVERRIDEABLE",
    )
    assert sdpa_kernel_choice(q, k, v, None, 0.5, True, enable_gqa=True) in (None, "MATH")  # dropout on CPU: math


@pytest.mark.parametrize(
    "flash,efficient,cudnn,expected",
    [
        (False, False, False, True),
        (False, True, False, False),
        (True, False, False, False),
        (False, False, True, False),
    ],
)
def test_cuda_asks_the_fused_kernels_with_enable_gqa(monkeypatch, flash, efficient, cudnn, expected):
    asked = []

    def check(answer):
        def can_use(params, debug=False):
            asked.append((params.enable_gqa, params.query.shape[1], params.key.shape[1], params.is_causal))
            return answer

        return can_use

    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", check(flash))
    monkeypatch.setattr(torch.backends.cuda, "can_use_efficient_attention", check(efficient))
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", check(cudnn), raising=False)
    q, k, v = gqa_tensors()
    assert CudaBackend().fp32_attention_needs_expanded_kv(q, k, v, None, 0.0, True) is expected
    assert asked and all(a == (True, 8, 2, True) for a in asked), asked


def test_mps_never_expands_and_says_what_fp32_costs():
    q, k, v = gqa_tensors()
    assert not MpsBackend().fp32_attention_needs_expanded_kv(q, k, v, None, 0.0, True)
    assert "blocks of queries" in MpsBackend.fp32_attention and "L x L" in MpsBackend.fp32_attention


def test_attention_modes_name_the_fp32_flows():
    assert attention.fp32_inside_attention("fp32", "adjacent") is not None
    assert attention.fp32_inside_attention("native", "peft") is not None
    assert attention.fp32_inside_attention("native", "adjacent") is None


def test_the_benchmark_runs_on_cpu(capsys):
    """benchmarks/attention_fp32.py at a tiny size: one JSON line per variant, each naming the kernel that ran."""
    import json

    benchmark = benchmark_scripts.load("attention_fp32")
    argv = ["--device", "cpu", "--lengths", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16"]
    assert benchmark.main([*argv, "--repeats", "1"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in records] == list(benchmark.VARIANTS)
    assert all(not r["oom"] and r["kernel"] is not None and r["ms"] > 0 for r in records), records
    ours = next(r for r in records if r["variant"] == "ours-fp32")
    assert ours["expanded"] is CpuBackend().fp32_attention_needs_expanded_kv(*gqa_tensors(), None, 0.0, True)


def test_the_kernel_choice_under_fake_tensors_is_the_real_one():
    """The memory forecast runs its step under FakeTensorMode, where torch's dispatcher answers MATH for every call:
    the backend must decide as for the real tensors, or the forecast predicts a path the real step does not take."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from portable_kbit.backends.sdpa import sdpa_kernel_choice

    q = torch.randn(1, 4, 256, 32, requires_grad=True)
    k = torch.randn(1, 2, 256, 32, requires_grad=True)
    real = sdpa_kernel_choice(q, k, k, None, 0.0, True, enable_gqa=True)
    with FakeTensorMode() as mode:
        fake = sdpa_kernel_choice(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(k), None, 0.0, True, True)
    assert real is not None and fake == real
