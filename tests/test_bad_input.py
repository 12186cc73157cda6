"""Bad input gets a clear error, and nothing changes.

Each case asserts the exception type and message, and compares the whole model state (tests/model_state.py) before
and after the call. Cases that need an accelerator (a model living on one) run where there is one and are skipped
with the reason elsewhere; the device-resolution logic behind them is also checked on the CPU through stand-ins.
"""

from __future__ import annotations

import importlib
import re
import types

import model_state
import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from torch import nn

import portable_kbit
from portable_kbit import backends
from portable_kbit.backends.cuda import CudaBackend
from portable_kbit.tools import tiny

prepare_module = importlib.import_module("portable_kbit.pipeline.prepare")  # portable_kbit.prepare is the function
TARGETS = tiny.LORA_TARGETS["llama"]


@pytest.fixture
def model(device):
    return tiny.load(tiny.checkpoint("llama"), "quanto-int4", device)


def refused(model, error_type, pattern, *args, **kwargs):
    """prepare(model, *args, **kwargs) raises error_type matching pattern, and the model is exactly as before."""
    before = model_state.take(model)
    with pytest.raises(error_type, match=pattern) as raised:
        portable_kbit.prepare(model, *args, **kwargs)
    model_state.assert_unchanged(before, model, f"refused call {args} {kwargs}")
    assert portable_kbit.report(model) is None
    assert not getattr(raised.value, "__notes__", None), "a refusal before any change has nothing to restore"
    return raised.value


# ---- options -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["all", "fp32", "", None, "ADJACENT"])
def test_unknown_upcast(model, value):
    refused(
        model, ValueError, r"upcast=.* is not a policy; use one of 'adjacent', 'norms', 'none', 'peft'", upcast=value
    )


@pytest.mark.parametrize("value", ["fp16", "bf16", None, "FP32"])
def test_unknown_activations(model, value):
    refused(model, ValueError, r"activations=.* is not known; use 'fp32' .* or 'native'", activations=value)


@pytest.mark.parametrize("value", [0, -1, -(1 << 20), 1.5, True, "64MiB"])
def test_chunk_bytes_not_positive_int(model, value):
    refused(model, ValueError, re.escape(f"chunk_bytes={value!r} must be a positive int"), chunk_bytes=value)


def test_gradient_checkpointing_kwargs_not_a_dict(model):
    refused(
        model,
        TypeError,
        "gradient_checkpointing_kwargs must be a dict or None, not list",
        gradient_checkpointing_kwargs=["use_reentrant"],
    )


# ---- devices --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["tpu", "gpu", "cuda0", "cuda:x", "npu:0", "xla"])
def test_unknown_device_string(model, value):
    refused(model, ValueError, re.escape(f"unknown device {value!r}: use 'auto', 'cuda', 'cuda:N'"), value)


@pytest.mark.parametrize("value", [0, 1.0, ["cpu"]])
def test_device_of_wrong_type(model, value):
    refused(model, TypeError, "device must be a string such as 'auto'", value)


def test_device_index_on_a_backend_without_indices(model):
    refused(model, ValueError, re.escape("device 'cpu:0': cpu takes no device index; use 'cpu'"), "cpu:0")


def test_unavailable_backend(model):
    unavailable = [name for name in backends.REGISTRY if name not in portable_kbit.available_backends()]
    assert unavailable, "every backend is available here?"
    for name in unavailable:
        reason = backends.get(name).why_unavailable()
        error = refused(
            model,
            portable_kbit.BackendUnavailableError,
            re.escape(f"device {name!r} is not available: {reason}"),
            name,
        )
        assert "Available here: " in str(error) and isinstance(error, ValueError)


def test_device_index_that_does_not_exist(model):
    accelerators = [n for n in portable_kbit.available_backends() if backends.get(n).device_type == "cuda"]
    if not accelerators:
        pytest.skip("needs a CUDA/ROCm backend here (on this machine cuda:N is refused as unavailable, tested above)")
    count = torch.cuda.device_count()
    refused(
        model,
        portable_kbit.BackendUnavailableError,
        f"does not exist: this machine has {count}",
        f"{accelerators[0]}:{count}",
    )


@pytest.fixture
def standin_cuda(monkeypatch):
    """A stand-in: the CUDA backend says it is available (no GPU is touched before the refusals below)."""
    monkeypatch.setattr(CudaBackend, "why_unavailable", lambda self: None)


def test_bitsandbytes_model_on_cpu_asked_for_an_accelerator(standin_cuda):
    # bitsandbytes quantizes while loading: a CPU-loaded model cannot be moved to the GPU afterwards
    model = tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu")
    refused(
        model,
        ValueError,
        r"this bitsandbytes model is on the CPU but device='cuda'.*device_map=\{'': 'cuda'\}",
        "cuda",
    )


def test_model_on_an_accelerator_asked_for_the_cpu(backend, device):
    if backend == "cpu":
        pytest.skip("needs a model on an accelerator; none here (the stand-in tests cover the resolution)")
    model = tiny.load(tiny.checkpoint("llama"), "quanto-int4", device)
    refused(model, ValueError, rf"the model is on {re.escape(str(model.device))} but device='cpu'", "cpu")


def test_model_on_one_gpu_asked_for_another():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA/ROCm GPUs (the stand-in test below covers the resolution on one machine)")
    model = tiny.load(tiny.checkpoint("llama"), "quanto-int4", "cuda:0")
    refused(model, ValueError, r"the model is on cuda:0 but device='cuda:1'", "cuda:1")


def test_device_resolution_of_a_model_split_over_gpus_standin(standin_cuda, monkeypatch):
    """Stand-in for a device_map split over cuda:0 and cuda:1: 'auto' and 'cuda' take it (each cast happens where its
    parameter is); an explicit index that does not hold the whole model is refused."""
    split = [torch.device("cuda", 0), torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    index = types.SimpleNamespace(devices=split, quantized={})  # what resolve_target reads of the model's index
    for device in ("auto", "cuda"):
        target, move_to = prepare_module.resolve_target(index, device)
        assert (target.backend.name, target.device, move_to) == ("cuda", split[0], None), device
    with pytest.raises(ValueError, match=r"the model is on cuda:0, cuda:1 but device='cuda:1'; pass device='auto'"):
        prepare_module.resolve_target(index, "cuda:1")


def test_device_resolution_of_a_model_split_over_kinds_standin(standin_cuda, monkeypatch):
    """Stand-in for a device_map split over a GPU and the CPU (CPU offload): refused whatever the device."""
    index = types.SimpleNamespace(devices=[torch.device("cuda", 0), torch.device("cpu")], quantized={})
    for device in ("auto", "cuda", "cpu"):
        with pytest.raises(ValueError, match=r"the model is split across cuda:0, cpu \(a device_map with offload\)"):
            prepare_module.resolve_target(index, device)


def test_model_split_over_two_gpus_by_device_map():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA/ROCm GPUs for a real device_map split")
    from transformers import AutoModelForCausalLM

    device_map = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.norm": 1,
        "model.rotary_emb": 1,
        "lm_head": 1,
    }
    model = AutoModelForCausalLM.from_pretrained(
        tiny.checkpoint("llama"),
        dtype=torch.bfloat16,
        device_map=device_map,
        quantization_config=tiny.quantization_config("bnb-nf4"),
    )
    refused(model, ValueError, r"but device='cuda:0'", "cuda:0")
    portable_kbit.prepare(model, target_modules=TARGETS, frozen_norms="upcast")
    assert {p.device.index for n, p in model.named_parameters() if "norm" in n} == {0, 1}
    report = portable_kbit.report(model)
    assert list(report.devices) == ["cuda:0", "cuda:1"]  # each measured, checked and released on its own
    for device, share in report.devices.items():
        assert share.before.device == device and share.after.allocated is not None and share.chunks >= 1
    assert report.required_bytes == sum(share.required_bytes for share in report.devices.values())
    _, losses = tiny.train_lora(model, TARGETS, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_model_split_by_device_map_with_disk_offload(tmp_path):
    from transformers import AutoModelForCausalLM

    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(
        tiny.checkpoint("llama"), dtype=torch.bfloat16, device_map=device_map, offload_folder=str(tmp_path)
    )
    refused(
        model,
        ValueError,
        r"parameters are offloaded by the device_map \(to disk; e\.g\. model\.layers\.1\..*"
        r"prepare\(\) needs every weight loaded on one device",
        target_modules=TARGETS,
    )


def test_model_loaded_with_a_device_map_on_one_device_is_fine(device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny.checkpoint("llama"), dtype=torch.bfloat16, device_map={"": device}
    )
    portable_kbit.prepare(model, target_modules=TARGETS, frozen_norms="upcast")
    assert portable_kbit.report(model).upcast


def test_model_on_the_meta_device():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny.config_for("llama"), dtype=torch.bfloat16)
    for device in ("auto", "cpu"):
        refused(
            model,
            ValueError,
            r"21 parameters are on the meta device \(e\.g\. model\.embed_tokens\.weight\): the "
            r"weights were never loaded",
            device,
        )


# ---- the model argument ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "meta-llama/Llama-3.2-1B", {"weight": torch.zeros(2)}, torch.zeros(2)])
def test_not_a_module(value):
    with pytest.raises(TypeError, match=rf"prepare\(\) takes a torch\.nn\.Module .*, not {type(value).__name__}$"):
        portable_kbit.prepare(value)
    if isinstance(value, dict):
        assert list(value) == ["weight"] and value["weight"].dtype == torch.float32


def test_module_without_parameters():
    module = nn.Sequential(nn.ReLU())
    refused(module, ValueError, "the model has no parameters: nothing to prepare")


# ---- target_modules and LoraConfig ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets,closest",
    [
        (["q_prj", "vproj"], "closest module names: o_proj, q_proj, v_proj"),
        (r".*\.qq_proj", "closest module names: o_proj, q_proj, v_proj"),
        (["attention.query"], "module names here: act_fn, down_proj, embed_tokens"),
        ([], "module names here: "),
    ],
)
def test_target_modules_matching_nothing(model, targets, closest):
    error = refused(model, ValueError, "matches no module of this model", target_modules=targets)
    assert closest in str(error)
    assert "Pass names that get_peft_model would match" in str(error)


def test_lora_config_whose_layers_match_nothing(model):
    config = LoraConfig(target_modules=TARGETS, layers_to_transform=[7])
    error = refused(model, ValueError, "matches no module of this model", target_modules=config)
    assert "layers_to_transform=[7]" in str(error)


@pytest.mark.parametrize("targets", [5, ["q_proj", 3], {"q_proj": 1}.items()])
def test_target_modules_of_wrong_type(model, targets):
    refused(
        model,
        TypeError,
        "target_modules must be module names .*, a regex .*, a peft LoraConfig or None",
        target_modules=targets,
    )


def test_peft_config_without_target_modules(model):
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    refused(
        model, ValueError, "target_modules is a PromptTuningConfig that names no target modules", target_modules=config
    )


@pytest.mark.parametrize(
    "conflict,extra,missing",
    [
        (LoraConfig(target_modules=["k_proj"]), "k_proj", "q_proj"),
        (["q_proj", "v_proj", "o_proj"], "o_proj", None),
        ("q_proj", None, "v_proj"),
    ],
)
def test_conflicting_lora_config_on_a_peft_model(device, conflict, extra, missing):
    base = tiny.load(tiny.checkpoint("llama"), "quanto-int4", device)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    error = refused(
        peft_model,
        ValueError,
        "target_modules disagrees with the adapters this PeftModel already has",
        target_modules=conflict,
    )
    message = str(error)
    named = message.split("named but not adapted: ")[1].split(";")[0]
    unnamed = message.split("adapted but not named: ")[1].split("]")[0]
    assert (extra in named) if extra else named == "[]", message
    assert (missing in unnamed) if missing else unnamed == "[", message
    assert "Leave target_modules=None for a PeftModel" in message


def test_agreeing_lora_config_on_a_peft_model_is_fine(device):
    base = tiny.load(tiny.checkpoint("llama"), "quanto-int4", device)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    portable_kbit.prepare(peft_model, target_modules=LoraConfig(target_modules=["v_proj", "q_proj"]))
    assert portable_kbit.report(peft_model).adapters_from == "PeftModel"


# ---- a quantizer we do not know: refuse to guess --------------------------------------------------------------------


class OpaqueTensor(torch.Tensor):
    """A tensor subclass of an unknown quantizer (it even reports a float dtype, as optimum-quanto's QTensors do)."""


def _unknown_quantizer_model(device, kind: str):
    model = tiny.load(tiny.checkpoint("llama"), "none", device)
    for layer in model.model.layers:
        linear = layer.mlp.up_proj
        if kind == "integer":  # GPTQ/AWQ/HQQ-style packed integer storage
            packed = torch.randint(-8, 8, linear.weight.shape, dtype=torch.int8, device=linear.weight.device)
            linear.weight = nn.Parameter(packed, requires_grad=False)
        else:
            linear.weight = nn.Parameter(linear.weight.detach().as_subclass(OpaqueTensor), requires_grad=False)
    return model


@pytest.mark.parametrize(
    "kind,label", [("integer", "unknown integer weight (int8)"), ("subclass", "unknown tensor subclass OpaqueTensor")]
)
@pytest.mark.parametrize("upcast", ["peft", "norms", "adjacent"])
def test_unknown_quantizer_is_treated_as_quantized_and_reported(device, kind, label, upcast):
    model = _unknown_quantizer_model(device, kind)
    unknown = {n: p for n, p in model.named_parameters() if "up_proj" in n}
    before = {n: (p.dtype, model_state.raw_bytes(p)) for n, p in unknown.items()}
    portable_kbit.prepare(model, target_modules=TARGETS, upcast=upcast)
    report = portable_kbit.report(model)
    assert report.quantizers == {label: 2}
    assert report.skipped_quantized == 2
    assert any(
        "treated as quantized and left untouched (quantizer not recognised)" in n and label in n for n in report.notes
    ), report.notes
    assert not any("up_proj" in name for name in report.upcast)
    for name, p in unknown.items():
        assert p.dtype == before[name][0] and torch.equal(model_state.raw_bytes(p), before[name][1]), name
        assert not p.requires_grad
    if upcast == "peft":  # everything else that is half precision was upcast, as peft does
        assert "lm_head.weight" in report.upcast and "model.embed_tokens.weight" in report.upcast
