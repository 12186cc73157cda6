"""peft's LoRA layers share one cast of each input (patches/adapter_casts.py): the same values and gradients, one
fp32 copy of the normed hidden states for q/k/v instead of three in "native" mode."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_blocks import peak_bytes
from test_layer_mode import load
from transformers import LlamaConfig, LlamaForCausalLM

import portable_kbit
from portable_kbit.patches import adapter_casts
from portable_kbit.patches.adapter_casts import CAST_METHOD, ShareAdapterCasts, SharedCasts
from portable_kbit.pipeline.prepare import STATE_ATTRIBUTE
from portable_kbit.tools import tiny

ATTENTION = tiny.LORA_TARGETS["llama"]  # q/k/v/o
CHECKPOINTING = {"use_reentrant": False}


def prepared(model, targets=ATTENTION, rank=4):
    portable_kbit.prepare(
        model, "auto", target_modules=targets, activations="native", gradient_checkpointing_kwargs=CHECKPOINTING
    )
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))


def the_patch(model) -> ShareAdapterCasts:
    (patch,) = getattr(model.get_base_model(), STATE_ATTRIBUTE).patches.of_type(ShareAdapterCasts)
    return patch


def step(model, device):
    model.train()
    ids = tiny.batch(256, 24, 1, device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_q_k_v_adapters_get_one_copy_and_the_same_gradients(backend, device):
    model = prepared(load(backend, device))
    q = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    seen: dict[str, torch.Tensor] = {}

    def record(module, args, name):
        seen.setdefault(name, args[0])  # the first call's input (the forward's, before any recompute)

    handles = [
        model.get_submodule(f"base_model.model.model.layers.0.self_attn.{n}.lora_A.default").register_forward_pre_hook(
            lambda module, args, n=n: record(module, args, n)
        )
        for n in ("q_proj", "k_proj", "v_proj")
    ]
    shared_loss, shared_grads = step(model, device)
    for handle in handles:
        handle.remove()
    # peft casts the bf16 input of each adapter to its fp32 weights: q, k and v got one and the same copy
    assert seen["q_proj"].dtype == torch.float32
    assert seen["k_proj"] is seen["q_proj"] and seen["v_proj"] is seen["q_proj"]
    patch = the_patch(model)
    # two layers, a forward and a recompute each: k and v reuse q's cast every time
    assert patch.memo.shared >= 2 * 2 * 2, patch.memo.shared
    assert patch.memo is adapter_casts._REGISTRY[q.get_base_layer()]
    patch.remove()  # peft's own cast again: the same loss and gradients, bit for bit
    assert q.get_base_layer() not in adapter_casts._REGISTRY
    assert CAST_METHOD not in q.__dict__  # nothing was ever put on the model's modules
    own_loss, own_grads = step(model, device)
    assert torch.equal(own_loss, shared_loss)
    assert own_grads.keys() == shared_grads.keys()
    for name, grad in own_grads.items():
        assert torch.equal(grad, shared_grads[name]), name


def test_memory_of_one_copy_not_three():
    """MemTracker (CPU): native mode, LoRA on q/k/v/o, 2048 tokens: sharing saves at least the two extra fp32 copies
    of the normed hidden states that q/k/v would keep, in each of the two layers' recomputes."""
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 2048))
    peaks = {}
    for shared in (True, False):
        model = prepared(copy.deepcopy(base), rank=8)
        if not shared:
            the_patch(model).remove()
        model.train()
        peaks[shared] = peak_bytes(model, {"input_ids": ids, "labels": ids})
    fp32_copy = 2048 * 256 * 4
    assert peaks[False] - peaks[True] >= 2 * fp32_copy, {k: v / fp32_copy for k, v in peaks.items()}


def test_memo_recasts_a_source_changed_in_place_and_follows_grad_mode():
    memo = SharedCasts()
    x = torch.ones(4, dtype=torch.bfloat16)
    first = memo.cast(x, torch.float32)
    assert memo.cast(x, torch.float32) is first and memo.shared == 1
    x.add_(1)  # a new version: a new copy, with the new values
    second = memo.cast(x, torch.float32)
    assert second is not first and torch.equal(second, torch.full((4,), 2.0))
    with torch.no_grad():
        assert memo.cast(x, torch.float32) is not second
    assert memo.cast(x, torch.bfloat16) is x  # nothing to cast
    assert memo.cast(x, torch.float32, enabled=False) is x  # peft's casting switched off
    del x, first, second
    assert len(memo.copies) == 0  # the copies live no longer than their source


def test_a_model_prepare_never_saw_casts_as_peft_does(backend, device):
    """peft's LoraLayer method is replaced once per process, and only registered layers share: the LoRA layers of a
    model prepare() never saw get a copy each, as from peft."""
    prepared(load(backend, device))  # another model: the replacement is in place
    model = get_peft_model(load(backend, device), LoraConfig(r=4, target_modules=ATTENTION, lora_dropout=0.0))
    seen = []
    for name in ("q_proj", "k_proj"):
        module = model.get_submodule(f"base_model.model.model.layers.0.self_attn.{name}.lora_A.default")
        module.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(input_ids=tiny.batch(256, 8, 1, device))
    assert seen[0].dtype == torch.float32 and seen[1] is not seen[0]


EVERY_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("token_blocks", [None, 8])
def test_same_step_with_blocks_and_either_checkpointing(backend, device, reentrant, token_blocks):
    """Adapters on every linear layer (gate/up share too), with token blocks (the blocked MLP recomputes in its own
    backward) and with reentrant checkpointing (whose first forward runs without grad): the loss and gradients are
    the same as with peft's own casts, bit for bit, and casts were shared."""
    results = {}
    for shared in (True, False):
        model = load(backend, device)
        portable_kbit.prepare(
            model,
            "auto",
            target_modules=EVERY_LINEAR,
            activations="native",
            token_blocks=token_blocks,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        )
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=EVERY_LINEAR, lora_dropout=0.0))
        patch = the_patch(model)
        if not shared:
            patch.remove()
        results[shared] = step(model, device)
        if shared:
            assert patch.memo.shared > 0
    (loss, grads), (own_loss, own_grads) = results[True], results[False]
    assert torch.equal(loss, own_loss)
    for name, grad in own_grads.items():
        assert torch.equal(grad, grads[name]), name
