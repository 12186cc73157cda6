"""prepare(tf32=True): torch's CUDA fp32 matmul precision set to TF32 on a device that has it, put back by a repeat
call without it and by a failed call; refused before any change where the device has none (the CPU here; the CUDA
backend's answer is tested against stand-ins for the device's capability, and for real on the lent GPU)."""

from __future__ import annotations

import model_state
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_llama import tiny_llama

import portable_kbit
from portable_kbit.backends.cpu import CpuBackend
from portable_kbit.backends.cuda import CudaBackend
from portable_kbit.backends.rocm import RocmBackend
from portable_kbit.patches.tf32 import Tf32Matmuls
from portable_kbit.pipeline import prepare as prepare_module

TARGETS = ["q_proj", "v_proj"]
SETTING = Tf32Matmuls.ATTRIBUTE


def setting():
    return getattr(torch.backends.cuda.matmul, SETTING)


@pytest.fixture
def restore_setting():
    before = setting()
    yield before
    setattr(torch.backends.cuda.matmul, SETTING, before)


@pytest.fixture
def tf32_standin(monkeypatch, restore_setting):
    """The CPU backend as if its device had TF32 (the setting is torch's and can be set on any build)."""
    monkeypatch.setattr(CpuBackend, "why_no_tf32", lambda self, device: None)
    return restore_setting


def test_refused_before_any_change_where_the_device_has_no_tf32(restore_setting):
    model = tiny_llama()
    before = model_state.take(model)
    with pytest.raises(ValueError, match=r"tf32=True: cpu has no TF32 matmuls .* Pass tf32=False"):
        portable_kbit.prepare(model, target_modules=TARGETS, tf32=True)
    model_state.assert_unchanged(before, model, "refused tf32 on the CPU")
    assert setting() == restore_setting
    with pytest.raises(ValueError, match=r"tf32='yes' is not valid"):
        portable_kbit.prepare(model, tf32="yes")
    model_state.assert_unchanged(before, model, "tf32='yes'")


def test_on_sets_torchs_setting_and_a_repeat_without_it_puts_it_back(tf32_standin):
    model = tiny_llama()
    portable_kbit.prepare(model, target_modules=TARGETS, tf32=True)
    assert setting() == Tf32Matmuls.ON
    report = portable_kbit.report(model)
    assert report.tf32 and report.tf32_reason.startswith("on: fp32 matmuls use TF32")
    assert f"torch.backends.cuda.matmul.{SETTING}" in report.summary()
    portable_kbit.prepare(model, target_modules=TARGETS)  # tf32=False: the last call's setting comes off
    assert setting() == tf32_standin
    assert not portable_kbit.report(model).tf32


def test_off_leaves_a_users_setting_alone(tf32_standin):
    setattr(torch.backends.cuda.matmul, SETTING, Tf32Matmuls.ON)  # the user's own choice, before prepare()
    model = tiny_llama()
    portable_kbit.prepare(model, target_modules=TARGETS, tf32=True)
    portable_kbit.prepare(model, target_modules=TARGETS)
    assert setting() == Tf32Matmuls.ON  # what tf32=True found is what the repeat puts back


def test_a_failure_after_the_setting_puts_it_back(tf32_standin, monkeypatch):
    def fail(shares):
        raise RuntimeError("injected after the TF32 setting")

    monkeypatch.setattr(prepare_module, "finish_on_devices", fail)
    model = tiny_llama()
    before = model_state.take(model)
    with pytest.raises(RuntimeError, match="injected"):
        portable_kbit.prepare(model, target_modules=TARGETS, tf32=True)
    assert setting() == tf32_standin
    model_state.assert_unchanged(before, model, "failed prepare(tf32=True)")


def test_cuda_backend_offers_tf32_from_ampere_on(monkeypatch):
    backend = CudaBackend()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "stand-in GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert backend.why_no_tf32(torch.device("cuda:0")) == "stand-in GPU (compute capability 7.5) has no TF32"
    for capability in ((8, 0), (8, 7), (9, 0)):  # A100, Jetson Orin, H100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        assert backend.why_no_tf32(torch.device("cuda:0")) is None
    assert "not offered on AMD GPUs" in RocmBackend().why_no_tf32(torch.device("cuda:0"))


def test_a_step_with_tf32_trains_like_fp32(backend, device, restore_setting):
    """Where the device has TF32 (CUDA, Ampere or newer): the setting is on during the step, and the loss and the
    adapters' gradients stay close to the fp32 step's (TF32 rounds matmul inputs to a 10-bit mantissa)."""
    from portable_kbit import backends

    target = backends.resolve(device)
    why_not = target.backend.why_no_tf32(target.device)
    if why_not is not None:
        pytest.skip(f"{why_not} (the stand-in tests cover the setting)")
    results = []
    for tf32 in (False, True):
        model = tiny_llama().to(device)
        portable_kbit.prepare(model, target_modules=TARGETS, tf32=tf32)
        assert (setting() == Tf32Matmuls.ON) == tf32
        torch.manual_seed(5)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
        model.train()
        ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1)).to(device)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.item(), grads))
    (loss, grads), (loss_tf32, grads_tf32) = results
    assert abs(loss_tf32 - loss) < 1e-2 * abs(loss)
    for name, grad in grads.items():
        assert torch.allclose(grads_tf32[name], grad, rtol=5e-2, atol=5e-3 * grad.abs().max().item()), name
