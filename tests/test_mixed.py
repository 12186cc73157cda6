"""activations="mixed": fp32 stream, norms and adapters as in "fp32"; attention's kernels and frozen MLPs in bf16."""

from __future__ import annotations

import pytest
import torch
from conftest import bitsandbytes_supports
from peft import LoraConfig, get_peft_model
from test_layer_mode import dtypes_seen, load

import portable_kbit
from portable_kbit.tools import tiny

ATTENTION = tiny.LORA_TARGETS["llama"]  # q/k/v/o
EVERY_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model.model."


def prepared(backend: str, device: str, activations: str, targets: list[str]):
    model = load(backend, device)
    portable_kbit.prepare(
        model,
        device,
        target_modules=targets,
        activations=activations,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))


def test_stream_and_adapters_fp32_mlp_and_attention_kernels_bf16(backend, device):
    model = prepared(backend, device, "mixed", ATTENTION)
    bf16, fp32 = torch.bfloat16, torch.float32
    names = ["embed_tokens", "layers.0", "layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.0.mlp"]
    names += ["layers.0.mlp.gate_proj", "layers.0.mlp.down_proj", "layers.0.post_attention_layernorm"]
    seen = dtypes_seen(model, [PREFIX + n for n in names], device)
    # the stream is fp32 from the embedding on, through every layer
    assert {out for _, out in seen[PREFIX + "embed_tokens"]} == {fp32}
    assert seen[PREFIX + "layers.0"] == {(fp32, fp32)}
    # the adapted projections take fp32 and hand fp32 on (the adapters' small deltas are added in fp32)
    assert seen[PREFIX + "layers.0.self_attn.q_proj"] == {(fp32, fp32)}
    assert seen[PREFIX + "layers.0.self_attn.o_proj"] == {(fp32, fp32)}
    # the frozen MLP computes as without preparation (its layers see bf16) and hands fp32 back to the stream; the
    # norm before it, which feeds no adapter, is left as in "fp32"
    assert seen[PREFIX + "layers.0.mlp"] == {(fp32, fp32)}
    assert {x for x, _ in seen[PREFIX + "layers.0.mlp.gate_proj"]} == {bf16}
    assert {x for x, _ in seen[PREFIX + "layers.0.mlp.down_proj"]} == {bf16}
    assert seen[PREFIX + "layers.0.post_attention_layernorm"] == {(fp32, fp32)}
    done = portable_kbit.report(model)
    assert done.activations == "mixed"
    # attention: fp32 q/k/v cast to bf16, every call counted as such (two layers: a forward and a recompute each)
    assert done.attention_calls.paths == {"sdpa in bfloat16": 4}, done.attention_calls
    assert "cast to bfloat16" in done.attention_reason


def test_adapted_mlp_stays_fp32(backend, device):
    """With adapters on the MLP, it computes in fp32 as in "fp32": the adapters' updates stay in fp32."""
    model = prepared(backend, device, "mixed", EVERY_LINEAR)
    names = [PREFIX + "layers.0.mlp.gate_proj", PREFIX + "layers.0.mlp.down_proj"]
    seen = dtypes_seen(model, names, device)
    assert seen[names[0]] == {(torch.float32, torch.float32)}
    assert seen[names[1]] == {(torch.float32, torch.float32)}


def test_trains_near_fp32_and_apart_from_it(backend, device):
    """Three AdamW steps: the losses stay near those of "fp32" (the same flow but for bf16 attention and MLP), and the
    adapters' gradients differ from fp32's by what rounding to bf16 makes, not by nothing (the flow is not fp32's)."""
    losses, grads = {}, {}
    for activations in ("fp32", "mixed"):
        model = prepared(backend, device, activations, ATTENTION)
        model.train()
        ids = tiny.batch(256, 32, 1, device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[activations] = []
        for step in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 0:
                grads[activations] = torch.cat(
                    [p.grad.flatten() for n, p in model.named_parameters() if "lora_B" in n]
                )
            optimizer.step()
            optimizer.zero_grad()
            losses[activations].append(loss.item())
    assert max(abs(a - b) for a, b in zip(losses["fp32"], losses["mixed"], strict=True)) < 2e-2, losses
    difference = (grads["mixed"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert 0 < difference < 5e-2, float(difference)


def test_unprepared_half_model_dtype_missing_keeps_fp32_attention(backend, device):
    """A model with no half-precision weight (nothing to compute in): "mixed" is "fp32", attention stays fp32."""
    model = tiny.load(tiny.checkpoint("llama"), "none", device).float()
    portable_kbit.prepare(model, device, target_modules=ATTENTION, activations="mixed")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=ATTENTION, lora_dropout=0.0))
    dtypes_seen(model, [], device)
    done = portable_kbit.report(model)
    assert not any("in bfloat16" in path for path in (done.attention_calls.paths if done.attention_calls else {}))


def test_sandwich_norms_keep_fp32(backend, device):
    """Gemma 2 normalizes each sublayer's output before adding it to the stream: that norm takes fp32 (the MLP hands
    fp32 back), so the update that o_proj's adapter makes reaches the stream in fp32."""
    if not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes 4-bit does not run on {backend}")
    targets = tiny.LORA_TARGETS["gemma2"]
    model = tiny.load(tiny.checkpoint("gemma2"), "bnb-nf4", device)
    portable_kbit.prepare(model, device, target_modules=targets, activations="mixed")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    names = [PREFIX + n for n in ("layers.0.post_attention_layernorm", "layers.0.post_feedforward_layernorm")]
    names.append(PREFIX + "layers.0.mlp.gate_proj")
    seen = dtypes_seen(model, names, device)
    assert {x for x, _ in seen[names[0]]} == {torch.float32}
    assert {x for x, _ in seen[names[1]]} == {torch.float32}
    assert {x for x, _ in seen[names[2]]} == {torch.bfloat16}


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_ablation_keeps_one_half(backend, device, part):
    """The benchmarks' ablations of mixed (tools.compare.mixed_ablation): "attention" leaves the frozen MLPs in fp32,
    "mlp" leaves attention in fp32; outside the context prepare() is mixed again."""
    from portable_kbit.tools.mixed_ablation import mixed_ablation

    with mixed_ablation(part):
        model = prepared(backend, device, "mixed", ATTENTION)
    gate = PREFIX + "layers.0.mlp.gate_proj"
    seen = dtypes_seen(model, [gate], device)
    done = portable_kbit.report(model)
    if part == "attention":
        assert {x for x, _ in seen[gate]} == {torch.float32}
        assert done.attention_calls.paths == {"sdpa in bfloat16": 4}, done.attention_calls
    else:
        assert {x for x, _ in seen[gate]} == {torch.bfloat16}
        assert "sdpa in bfloat16" not in done.attention_calls.paths, done.attention_calls
    whole = prepared(backend, device, "mixed", ATTENTION)  # the stubs are gone
    assert {x for x, _ in dtypes_seen(whole, [gate], device)[gate]} == {torch.bfloat16}
    with pytest.raises(ValueError, match="mixed ablation"), mixed_ablation("norms"):
        pass
