"""Calling prepare() twice, and in either order with get_peft_model; saving and reloading adapters.

- A second identical call changes nothing: no second upcast, no duplicate hooks, and its report says so.
- prepare() before get_peft_model (with target_modules) and after it (on the PeftModel) give the same dtypes and the
  same loss for 5 steps.
- Adapters saved with save_pretrained and loaded onto a freshly prepared model reproduce the logits.
"""

from __future__ import annotations

import math

import model_state
import pytest
import torch
from conftest import bitsandbytes_supports
from peft import LoraConfig, PeftModel, get_peft_model

import portable_kbit
from portable_kbit.tools import tiny

# a bitsandbytes and an optimum-quanto model, across norm styles: RMSNorm, 1+weight RMSNorm, LayerNorm with bias
CASES = [("llama", "bnb-nf4"), ("gemma2", "quanto-int4"), ("gpt2", "bnb-nf4"), ("qwen3", "quanto-int8")]
IDS = [f"{a}-{q}" for a, q in CASES]


def load(arch: str, quantizer: str, backend: str, device: str):
    if quantizer.startswith("bnb") and not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes does not run on {backend}")
    return tiny.load(tiny.checkpoint(arch), quantizer, device)


def lora_config(arch: str) -> LoraConfig:
    # what tiny.train_lora attaches
    return LoraConfig(r=8, lora_alpha=16, target_modules=tiny.LORA_TARGETS[arch], lora_dropout=0.0)


def hooks_per_module(model) -> dict[str, int]:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {n: sum(len(getattr(m, h)) for h in names) for n, m in model.named_modules()}


def dtypes(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters()}


def logits(model, device) -> torch.Tensor:
    model.eval()
    ids = tiny.batch(256, 16, 3, device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


# ---- twice ----------------------------------------------------------------------------------------------------------


def override_depths(model) -> dict[str, int]:
    """How many of our instance forwards wrap each other on each module (a repeat must not stack them)."""
    from portable_kbit.patches.protocol import InstanceForward

    depths = {}
    for name, module in model.named_modules():
        depth, forward = 0, module.__dict__.get("forward")
        while isinstance(getattr(forward, "patch", None), InstanceForward):
            depth, forward = depth + 1, forward.patch.previous
        if depth:
            depths[name] = depth
    return depths


@pytest.mark.parametrize("upcast,frozen_norms", [("adjacent", "compute"), ("adjacent", "upcast"), ("peft", "compute")])
@pytest.mark.parametrize("arch,quantizer", CASES, ids=IDS)
def test_prepare_twice_is_idempotent(backend, device, arch, quantizer, upcast, frozen_norms):
    model = load(arch, quantizer, backend, device)
    kwargs = dict(target_modules=tiny.LORA_TARGETS[arch], upcast=upcast, frozen_norms=frozen_norms)
    portable_kbit.prepare(model, **kwargs)
    first = portable_kbit.report(model)
    casts = upcast == "peft" or frozen_norms == "upcast"
    assert first.changed_anything == casts
    assert bool(first.fp32_compute_norms) == (not casts)
    depths = override_depths(model)
    assert set(depths.values()) <= {1} and all(depths.get(n) == 1 for n in first.fp32_compute_norms)
    state, hooks = model_state.take(model), hooks_per_module(model)
    require_grads_hook = model.__dict__.get("_require_grads_hooks") or model.__dict__.get("_require_grads_hook")

    assert portable_kbit.prepare(model, **kwargs) is model
    second = portable_kbit.report(model)
    assert second is not first
    assert second.upcast == [] and not second.changed_anything, "a second upcast"
    if upcast == "adjacent":  # the same norms are planned again, and found fp32 already (or computed in fp32)
        assert sorted(second.already_fp32) == sorted(first.upcast + first.already_fp32)
    else:  # "peft" plans the fp16/bf16 parameters: there are none left
        assert second.already_fp32 == first.already_fp32
    assert second.upcast_norms == first.upcast_norms
    assert second.fp32_compute_norms == first.fp32_compute_norms
    assert override_depths(model) == depths, "stacked (or lost) instance forwards"
    assert second.input_guards == first.input_guards
    assert "upcast 0 parameters" in second.summary() and second.upcast == []
    assert hooks_per_module(model) == hooks, "duplicate (or lost) hooks"
    now = model_state.take(model)
    assert now.params.keys() == state.params.keys()
    for name, before in state.params.items():
        after = now.params[name]
        assert (after["dtype"], after["requires_grad"], after["id"]) == (
            before["dtype"],
            before["requires_grad"],
            before["id"],
        )
        assert model_state.same_bytes(after["bytes"], before["bytes"]), f"{name} changed"
    for name, record in state.modules.items():  # checkpointing flags and functions, input-grad hooks: untouched
        for attr in (
            "gradient_checkpointing",
            "_gradient_checkpointing_func",
            "_require_grads_hook",
            "_require_grads_hooks",
            "training",
        ):
            assert now.modules[name].get(attr) == record.get(attr), f"{name}.{attr} changed"
    assert (
        model.__dict__.get("_require_grads_hooks") or model.__dict__.get("_require_grads_hook")
    ) is require_grads_hook

    # and the twice-prepared model trains like a once-prepared one
    torch.manual_seed(0)
    _, losses = tiny.train_lora(model, tiny.LORA_TARGETS[arch], steps=3)
    once = load(arch, quantizer, backend, device)
    portable_kbit.prepare(once, **kwargs)
    torch.manual_seed(0)
    _, losses_once = tiny.train_lora(once, tiny.LORA_TARGETS[arch], steps=3)
    assert losses == losses_once


def test_second_call_with_another_policy_adds_only_the_difference(backend, device):
    arch = "llama"
    model = load(arch, "quanto-int4", backend, device)
    options = dict(target_modules=tiny.LORA_TARGETS[arch], frozen_norms="upcast")
    portable_kbit.prepare(model, upcast="adjacent", **options)
    first = portable_kbit.report(model)
    hooks = sum(hooks_per_module(model).values())
    portable_kbit.prepare(model, upcast="norms", **options)
    second = portable_kbit.report(model)
    assert set(second.already_fp32) == set(first.upcast)
    assert second.upcast and not set(second.upcast) & set(first.upcast)
    assert all(model.get_parameter(n).dtype == torch.float32 for n in first.upcast + second.upcast)
    # the old call's flow hooks were replaced, not added to: two per guarded consumer (an upcast norm's casts are
    # in its instance forward)
    expected = hooks + 2 * (second.input_guards - first.input_guards)
    assert sum(hooks_per_module(model).values()) == expected


def test_second_call_switching_activations_replaces_the_flow_hooks(backend, device):
    arch = "llama"
    model = load(arch, "quanto-int4", backend, device)
    norm = model.model.layers[0].input_layernorm
    x = tiny.batch(256, 8, 0, device)
    hooks_by_mode: dict = {}
    modes = (
        ("fp32", torch.float32),
        ("native", torch.bfloat16),
        ("layer", torch.float32),
        ("mixed", torch.float32),
        ("fp32", torch.float32),
    )
    for activations, expected in modes:
        portable_kbit.prepare(model, target_modules=tiny.LORA_TARGETS[arch], activations=activations)
        assert norm.weight.dtype == torch.bfloat16  # computed in fp32 at call time, in both modes
        # The modes install different hooks (fp32 also casts the embedding output up and computes lm_head in fp32
        # through an instance forward); a repeat of a mode installs exactly what its first call did: no duplicates.
        assert hooks_by_mode.setdefault(activations, hooks_per_module(model)) == hooks_per_module(model)
        assert ("forward" in model.lm_head.__dict__) == (activations in ("fp32", "mixed", "layer"))
        assert override_depths(model).get("lm_head", 0) == (activations in ("fp32", "mixed", "layer"))
        assert override_depths(model)["model.layers.0.input_layernorm"] == 1
        seen = []
        probe = norm.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out.dtype))  # after the flow hooks
        with torch.no_grad():
            model(input_ids=x)
        probe.remove()
        assert seen[0] == expected, activations


def test_prepare_on_the_peft_model_after_prepare_on_the_base(backend, device):
    arch = "llama"
    model = load(arch, "bnb-nf4", backend, device)
    portable_kbit.prepare(model, target_modules=tiny.LORA_TARGETS[arch])
    first = portable_kbit.report(model)
    peft_model = get_peft_model(model, lora_config(arch))
    portable_kbit.prepare(peft_model)
    second = portable_kbit.report(peft_model)
    assert second.upcast == [] and second.adapters_from == "PeftModel"
    assert len(second.upcast_norms) == len(first.upcast_norms)
    _, losses = tiny.train_lora(peft_model, tiny.LORA_TARGETS[arch], steps=2)
    assert all(math.isfinite(x) for x in losses)


# ---- either order ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activations", ["fp32", "native"])
@pytest.mark.parametrize("arch,quantizer", CASES, ids=IDS)
def test_before_and_after_get_peft_model_agree(backend, device, arch, quantizer, activations):
    targets = tiny.LORA_TARGETS[arch]

    before = load(arch, quantizer, backend, device)  # prepare, then get_peft_model
    portable_kbit.prepare(before, target_modules=targets, activations=activations)
    torch.manual_seed(0)
    before = get_peft_model(before, lora_config(arch))

    after = load(arch, quantizer, backend, device)  # get_peft_model, then prepare on the PeftModel
    torch.manual_seed(0)
    after = get_peft_model(after, lora_config(arch))
    portable_kbit.prepare(after, activations=activations)

    assert dtypes(before) == dtypes(after)
    assert {n for n, p in before.named_parameters() if p.requires_grad} == {
        n for n, p in after.named_parameters() if p.requires_grad
    }
    assert portable_kbit.report(after).upcast_norms == [
        "base_model.model." + n for n in portable_kbit.report(before.get_base_model()).upcast_norms
    ]
    torch.manual_seed(1)  # the same dropout masks (GPT-2 has dropout)
    _, losses_before = tiny.train_lora(before, targets, steps=5)
    torch.manual_seed(1)
    _, losses_after = tiny.train_lora(after, targets, steps=5)
    assert all(math.isfinite(x) for x in losses_before)
    assert losses_before == pytest.approx(losses_after, rel=0, abs=1e-5)


# ---- save and reload ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,quantizer", CASES, ids=IDS)
def test_saved_adapters_reload_onto_a_freshly_prepared_model(backend, device, arch, quantizer, tmp_path):
    targets = tiny.LORA_TARGETS[arch]
    model = load(arch, quantizer, backend, device)
    portable_kbit.prepare(model, target_modules=targets)
    torch.manual_seed(0)
    trained, losses = tiny.train_lora(model, targets, steps=3)
    assert losses[-1] < losses[0]
    expected = logits(trained, device)
    trained.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved

    # prepare the fresh model first, then load the adapters onto it
    fresh = load(arch, quantizer, backend, device)
    portable_kbit.prepare(fresh, target_modules=targets)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(logits(reloaded, device), expected)

    # or load the adapters first, then prepare the PeftModel
    fresh = load(arch, quantizer, backend, device)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    portable_kbit.prepare(reloaded)
    assert any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n), "adapters frozen by prepare()"
    assert torch.equal(logits(reloaded, device), expected)
