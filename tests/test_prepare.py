"""prepare() on tiny quantized models: what it changes, what it never touches, and how it compares with peft.

Every test runs once per backend available here (the `backend` / `device` fixtures of conftest.py). Models come from
`portable_kbit.tools.tiny`: a random bf16 Llama of 2 layers, hidden 128, saved once per process and loaded through a
real quantizer (bitsandbytes nf4 or optimum-quanto int4).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import bitsandbytes_supports
from peft import LoraConfig, get_peft_model
from peft_baseline import TORCHS_DEFAULT_CHECKPOINTING, prepare_with_peft

import portable_kbit
from portable_kbit.model.hf import is_checkpointing
from portable_kbit.tools import tiny

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADJACENT = ["model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"]
ALL_NORMS = [
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
]


# ---- helpers --------------------------------------------------------------------------------------------------------


def load_bnb(backend: str, device: str):
    if not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes 4-bit does not run on {backend}")
    return tiny.load(tiny.checkpoint("llama"), "bnb-nf4", device)


def load_quanto(device: str):
    return tiny.load(tiny.checkpoint("llama"), "quanto-int4", device)


def params4bit(model) -> dict:
    import bitsandbytes as bnb

    return {name: p for name, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}


def _freeze_value(value):
    """A deep, detached copy of a quant_state field (tensors cloned, nested QuantState recursed)."""
    import bitsandbytes as bnb

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, bnb.functional.QuantState):
        return {key: _freeze_value(v) for key, v in vars(value).items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_freeze_value(v) for v in value)
    return value


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that the comparison is bit for bit (NaN and -0.0 included)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and torch.equal(_bytes(a), _bytes(b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def quantized_state(model) -> dict:
    """Every Params4bit: the object itself, its raw bytes, and every quant_state field."""
    state = {}
    for name, p in params4bit(model).items():
        state[name] = {
            "object": p,
            "data": _freeze_value(p.data),
            "quant_state": _freeze_value(p.quant_state),
        }
    return state


def fp32_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.dtype == torch.float32}


def checkpointing_on(model) -> bool:
    return is_checkpointing(model)


def checkpointing_kwargs(model) -> dict:
    """The keywords of each module's checkpoint function (what torch.utils.checkpoint will be called with)."""
    return {
        name: dict(getattr(m.__dict__["_gradient_checkpointing_func"], "keywords", {}) or {})
        for name, m in model.named_modules()
        if "_gradient_checkpointing_func" in m.__dict__
    }


def input_grads_hooked(model) -> bool:
    return bool(model.__dict__.get("_require_grads_hooks")) or model.__dict__.get("_require_grads_hook") is not None


def train_steps(model, steps: int):
    """Own loop: LoRA already attached; returns (losses, per-step {param name: grad copy}) read before zero_grad."""
    model.train()
    embeddings = model.get_input_embeddings().weight
    ids = tiny.batch(embeddings.shape[0], 32, 1, str(embeddings.device))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(
            {
                name: (p.grad.detach().float().clone() if p.grad is not None else None)
                for name, p in model.named_parameters()
                if "lora_A" in name or "lora_B" in name
            }
        )
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.item()))
    return losses, grads


# ---- what prepare() changes and what it never touches -------------------------------------------------------------


@pytest.mark.parametrize("frozen_norms", ["compute", "upcast"])
def test_adjacent_changes_only_adjacent_norms_and_never_a_quantized_weight(backend, device, frozen_norms):
    model = load_bnb(backend, device)
    quantized_before = quantized_state(model)
    assert len(quantized_before) == 14  # 7 projections x 2 layers
    dtypes_before = {name: p.dtype for name, p in model.named_parameters()}
    values_before = {
        name: p.detach().float().clone() for name, p in model.named_parameters() if name not in quantized_before
    }

    returned = portable_kbit.prepare(model, backend, target_modules=TARGETS, frozen_norms=frozen_norms)
    assert returned is model
    cast = ADJACENT if frozen_norms == "upcast" else []  # "compute": fp32 at call time, no parameter cast

    # no quantized weight changed, bit for bit (same object, same bytes, same quant_state fields)
    quantized_after = quantized_state(model)
    assert quantized_after.keys() == quantized_before.keys()
    for name, before in quantized_before.items():
        after = quantized_after[name]
        assert after["object"] is before["object"], f"{name} was replaced"
        assert _same(after["data"], before["data"]), f"{name}: packed 4-bit data changed"
        assert _same(after["quant_state"], before["quant_state"]), f"{name}: quant_state changed"

    params = dict(model.named_parameters())
    # embeddings and lm_head keep bf16: no fp32 copies of frozen weights
    assert params["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert params["lm_head.weight"].dtype == torch.bfloat16
    # "upcast": exactly the norms that feed q,k,v (input_layernorm) are fp32; every other norm stays bf16.
    # "compute": no parameter changes dtype
    for name in ALL_NORMS:
        expected = torch.float32 if name in cast else torch.bfloat16
        assert params[name].dtype == expected, f"{name}: {params[name].dtype}, expected {expected}"
    assert fp32_names(model) == set(cast)
    # the upcast is exact and nothing else changed dtype or value
    for name, value in values_before.items():
        assert torch.equal(params[name].detach().float(), value), f"{name} changed value"
        if name not in cast:
            assert params[name].dtype == dtypes_before[name]
    assert not any(p.requires_grad for p in model.parameters())

    report = portable_kbit.report(model)
    assert report is not None
    assert report.backend == backend
    assert report.policy == "adjacent" and report.activations == "fp32"
    assert sorted(report.upcast) == sorted(cast)
    assert sorted(report.upcast_norms) == sorted(n.rsplit(".", 1)[0] for n in ADJACENT)
    assert report.fp32_compute_norms == (report.upcast_norms if frozen_norms == "compute" else [])
    assert report.skipped_quantized == len(params4bit(model))
    assert report.quantizers == {"bitsandbytes-4bit": len(params4bit(model))}
    assert report.gradient_checkpointing is True
    assert report.chunk_bytes > 0
    assert (
        (report.chunks >= 1 and report.required_bytes > 0) if cast else (report.chunks == report.required_bytes == 0)
    )
    for snap in (report.before, report.after, report.peak):
        assert snap.backend == backend
        assert snap.process_rss > 0
        assert snap.host_available > 0 and snap.host_total >= snap.host_available
        if backend in ("cuda", "rocm"):
            assert snap.allocated is not None and snap.reserved is not None
            assert snap.allocated > 0  # the 4-bit weights live there
    assert report.after.taken_at >= report.before.taken_at
    assert report.seconds > 0
    assert isinstance(report.rss_delta, int)
    assert report.to_dict()["upcast"] == report.upcast


def test_adjacent_fp32_follows_peft_loss_curve(backend, device):
    reference = load_bnb(backend, device)
    prepare_with_peft(reference, gradient_checkpointing_kwargs=TORCHS_DEFAULT_CHECKPOINTING)
    torch.manual_seed(0)
    _, peft_losses = tiny.train_lora(reference, TARGETS, steps=5)

    model = load_bnb(backend, device)
    portable_kbit.prepare(model, backend, target_modules=TARGETS, upcast="adjacent", activations="fp32")
    torch.manual_seed(0)
    _, our_losses = tiny.train_lora(model, TARGETS, steps=5)

    assert len(our_losses) == len(peft_losses) == 5
    assert all(math.isfinite(x) for x in our_losses)
    assert our_losses[-1] < our_losses[0]  # it learns
    for step, (ours, theirs) in enumerate(zip(our_losses, peft_losses, strict=True), start=1):
        assert abs(ours - theirs) < 1e-3, f"step {step}: ours {ours:.5f}, peft {theirs:.5f}"


def test_quanto_int4_peft_fails_ours_trains(backend, device):
    from optimum.quanto import QTensor

    with pytest.raises(ValueError):
        prepare_with_peft(load_quanto(device))

    model = load_quanto(device)
    qtensors = {name: p for name, p in model.named_parameters() if isinstance(p, QTensor)}
    assert qtensors, "the quanto model has no QTensor weights"
    dequantized_before = {name: p.dequantize().detach().clone() for name, p in qtensors.items()}

    portable_kbit.prepare(model, backend, target_modules=TARGETS)
    report = portable_kbit.report(model)
    assert report.skipped_quantized == len(qtensors)
    assert report.quantizers == {"optimum-quanto": len(qtensors)}
    assert sorted(report.fp32_compute_norms) == sorted(n.rsplit(".", 1)[0] for n in ADJACENT)
    assert report.upcast == []
    for name, p in model.named_parameters():
        if name in qtensors:
            assert p is qtensors[name]
            assert torch.equal(p.dequantize(), dequantized_before[name]), f"{name} changed"

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    losses, grads = train_steps(model, steps=3)
    assert all(math.isfinite(x) for x in losses), losses
    assert grads[0], "no LoRA parameters found"
    for step, step_grads in enumerate(grads):
        for name, grad in step_grads.items():
            assert grad is not None, f"step {step + 1}: {name} has no gradient"
            assert torch.isfinite(grad).all(), f"step {step + 1}: {name} has a non-finite gradient"
            # lora_B starts at zero, so lora_A's first gradient is zero by construction; after one step both move
            if "lora_B" in name or step > 0:
                assert grad.abs().sum() > 0, f"step {step + 1}: {name} has an all-zero gradient"


# ---- drop-in for peft's signature -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((), {}),
        ((True,), {}),
        ((), {"use_gradient_checkpointing": False, "gradient_checkpointing_kwargs": {"use_reentrant": False}}),
        ((), {"gradient_checkpointing_kwargs": {"use_reentrant": False}}),
    ],
    ids=["default", "positional-true", "no-checkpointing-with-kwargs", "non-reentrant"],
)
def test_peft_compatible_calls(backend, device, args, kwargs):
    theirs = load_bnb(backend, device)
    ours = load_bnb(backend, device)
    assert any(p.requires_grad for p in ours.parameters())  # so freezing is observable
    assert not checkpointing_on(ours) and not input_grads_hooked(ours)

    prepare_with_peft(theirs, *args, **kwargs)
    portable_kbit.prepare(ours, *args, **kwargs)

    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()
    }
    assert checkpointing_on(ours) == checkpointing_on(theirs)
    # peft's kwargs, with torch's default said explicitly where peft leaves it out (torch warns at every call then)
    assert checkpointing_kwargs(ours) == {
        name: {"use_reentrant": True, **theirs_kwargs} for name, theirs_kwargs in checkpointing_kwargs(theirs).items()
    }
    assert input_grads_hooked(ours) == input_grads_hooked(theirs)
    expected_on = kwargs.get("use_gradient_checkpointing", args[0] if args else True)
    assert checkpointing_on(ours) is expected_on
    assert portable_kbit.report(ours).gradient_checkpointing is expected_on


# ---- upcast policies ------------------------------------------------------------------------------------------------


def test_policy_none_upcasts_nothing(backend, device):
    model = load_bnb(backend, device)
    portable_kbit.prepare(model, backend, target_modules=TARGETS, upcast="none")
    assert fp32_names(model) == set()
    assert portable_kbit.report(model).upcast == []
    assert portable_kbit.report(model).policy == "none"


@pytest.mark.parametrize("frozen_norms", ["compute", "upcast"])
def test_policy_norms_upcasts_every_norm(backend, device, frozen_norms):
    model = load_bnb(backend, device)
    portable_kbit.prepare(model, backend, target_modules=TARGETS, upcast="norms", frozen_norms=frozen_norms)
    report = portable_kbit.report(model)
    assert sorted(report.upcast_norms) == sorted(n.rsplit(".", 1)[0] for n in ALL_NORMS)
    cast = ALL_NORMS if frozen_norms == "upcast" else []
    assert fp32_names(model) == set(cast)
    assert sorted(report.upcast) == sorted(cast)


def test_policy_peft_upcasts_what_peft_upcasts(backend, device):
    reference = load_bnb(backend, device)
    prepare_with_peft(reference)
    expected = fp32_names(reference)
    assert {"model.embed_tokens.weight", "lm_head.weight", *ALL_NORMS} <= expected

    model = load_bnb(backend, device)
    portable_kbit.prepare(model, backend, upcast="peft")
    assert fp32_names(model) == expected
    assert set(portable_kbit.report(model).upcast) == expected
    assert len(params4bit(model)) == 14  # still 4-bit


@pytest.mark.parametrize("policy", ["adjacent", "norms", "none", "peft"])
@pytest.mark.parametrize("frozen_norms", ["compute", "upcast"])
def test_modules_to_save_upcast_under_every_policy(backend, device, policy, frozen_norms):
    model = load_bnb(backend, device)
    config = LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head"])
    portable_kbit.prepare(model, backend, target_modules=config, upcast=policy, frozen_norms=frozen_norms)
    upcast = set(portable_kbit.report(model).upcast)
    assert model.lm_head.weight.dtype == torch.float32  # trained in full: real fp32 storage under every mode
    assert "lm_head.weight" in upcast
    cast_norms = frozen_norms == "upcast"
    expected = {
        "adjacent": (set(ADJACENT) if cast_norms else set()) | {"lm_head.weight"},
        "norms": (set(ALL_NORMS) if cast_norms else set()) | {"lm_head.weight"},
        "none": {"lm_head.weight"},
        "peft": None,  # checked against peft in test_policy_peft_upcasts_what_peft_upcasts
    }[policy]
    if expected is not None:
        assert fp32_names(model) == expected
    # the prepared model still runs forward with an fp32 lm_head
    ids = tiny.batch(256, 8, 1, device)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


# ---- the dtype that flows out of upcast norms -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "activations, expected", [("native", torch.bfloat16), ("fp32", torch.float32), ("layer", torch.float32)]
)
def test_activations_set_upcast_norm_output_dtype(backend, device, activations, expected):
    model = load_bnb(backend, device)
    portable_kbit.prepare(model, backend, target_modules=TARGETS, activations=activations, frozen_norms="upcast")
    seen: dict[str, torch.dtype] = {}
    handles = []
    for name in ADJACENT:
        norm_name = name.rsplit(".", 1)[0]
        norm = model.get_submodule(norm_name)
        assert norm.weight.dtype == torch.float32  # upcast in both modes

        def record(module, args, output, norm_name=norm_name):
            seen[norm_name] = output.dtype

        handles.append(norm.register_forward_hook(record))  # registered last: sees the flow hook's result
    try:
        ids = tiny.batch(256, 8, 1, device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {name.rsplit(".", 1)[0]: expected for name in ADJACENT}
    assert torch.isfinite(logits.float()).all()
    assert portable_kbit.report(model).activations == activations


def test_fp32_flow_computes_lm_head_in_fp32_without_an_fp32_weight(backend, device):
    # lm_head stays bf16 in memory; with fp32 activations it computes in fp32 block by block (here 8 rows a block),
    # forward and backward, which is what makes the loss curve match peft's fp32 lm_head.
    model = load_bnb(backend, device)
    portable_kbit.prepare(model, backend, target_modules=TARGETS, chunk_bytes=8 * 4 * 128)
    head = model.lm_head
    assert head.weight.dtype == torch.bfloat16
    x = torch.randn(2, 5, head.in_features, device=head.weight.device, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_(True)
    y = head(x)
    reference = torch.nn.functional.linear(reference_x, head.weight.detach().float())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    reference.square().sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-5, atol=1e-4)
    assert head.weight.grad is None and head.weight.dtype == torch.bfloat16

    portable_kbit.prepare(model, backend, target_modules=TARGETS, activations="native")  # back to a bf16 head
    assert "forward" not in head.__dict__
    assert head(x.detach().bfloat16()).dtype == torch.bfloat16
