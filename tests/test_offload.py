"""prepare(offload_checkpoints=...): the layer inputs gradient checkpointing keeps go to host memory where the device
has memory of its own, and come back for the backward with the same values: the same loss and gradients. Refused
before any change where it cannot help (the CPU and unified memory here; a CUDA GPU is where it runs for real, with a
side stream and pinned memory: benchmarks/long_sequences.py on the GPU). On the CPU, a stand-in backend with "its
own memory" runs the hooks for real (copies from the CPU to the CPU, no stream)."""

from __future__ import annotations

import copy
import gc

import model_state
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_llama import tiny_llama

import portable_kbit
from portable_kbit.backends.cpu import CpuBackend
from portable_kbit.patches import offload as offload_module
from portable_kbit.patches.offload import CheckpointOffload

TARGETS = ["q_proj", "v_proj"]


def llama():
    return tiny_llama(num_hidden_layers=3)


@pytest.fixture
def discrete_standin(monkeypatch):
    """The CPU backend as if the device had memory of its own, and every saved tensor worth a copy."""
    monkeypatch.setattr(CpuBackend, "why_no_offload", lambda self, device: None)
    monkeypatch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 0)


def step(model, checkpointing, **prepare_kwargs):
    portable_kbit.prepare(model, target_modules=TARGETS, gradient_checkpointing_kwargs=checkpointing, **prepare_kwargs)
    torch.manual_seed(5)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    model.train()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1)).to(model.device)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, model


CASES = {
    "non-reentrant": ({"use_reentrant": False}, {}),
    "reentrant": ({"use_reentrant": True}, {}),
    "layer mode": ({"use_reentrant": False}, {"activations": "layer"}),
    "token blocks": ({"use_reentrant": False}, {"token_blocks": 16}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_offloaded_inputs_give_the_same_loss_and_gradients(discrete_standin, case):
    checkpointing, options = CASES[case]
    base = llama()
    kept = step(copy.deepcopy(base), checkpointing, offload_checkpoints=False, **options)
    moved = step(copy.deepcopy(base), checkpointing, offload_checkpoints=True, **options)
    assert moved[0] == kept[0]
    assert all(torch.equal(moved[1][n], kept[1][n]) for n in kept[1])
    report = portable_kbit.report(moved[2].get_base_model())
    assert report.offload_checkpoints and report.offload is not None
    assert report.offload.offloaded >= 3, report.offload.to_dict()  # each layer's input, once per step
    assert report.offload.peak_host_bytes >= 3 * 2 * 40 * 64 * 4  # three [2, 40, 64] fp32 inputs at least
    assert "offloaded to host memory" in report.summary()


def test_host_copies_are_freed_with_the_graph(discrete_standin):
    _, _, model = step(llama(), {"use_reentrant": False}, offload_checkpoints=True)
    offload = portable_kbit.report(model.get_base_model()).offload
    gc.collect()
    assert offload.host_bytes == 0 and offload.peak_host_bytes > 0  # the backward ran: nothing held any more


@pytest.mark.parametrize("checkpointing", [{"use_reentrant": False}, {"use_reentrant": True}])
def test_only_the_checkpoints_inputs_go_to_the_host(checkpointing):
    """Inside the layer the checkpoint's own hooks stay innermost: one saved input per layer call, deduplicated."""
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    offload = CheckpointOffload(torch.device("cpu"), min_bytes=0)
    run = offload.wrap(lambda function, *args: torch.utils.checkpoint.checkpoint(function, *args, **checkpointing))
    x = torch.randn(4, 8, requires_grad=True)
    out = run(layer, run(layer, x))
    assert offload.offloaded == 2
    out.sum().backward()
    expected = torch.autograd.grad(layer(layer(x)).sum(), x)[0]
    assert torch.allclose(x.grad, expected)


def test_small_tensors_and_parameters_stay_on_the_device():
    offload = CheckpointOffload(torch.device("cpu"))  # the default threshold: a MiB
    small = torch.zeros(4)
    assert offload.pack(small) is small and offload.kept == {"smaller than a copy is worth": 1}
    weight = torch.nn.Parameter(torch.zeros(1 << 19))
    assert offload.pack(weight) is weight and offload.kept["a parameter or a tensor subclass"] == 1
    big = torch.zeros(1 << 19)  # 2 MiB
    packed = offload.pack(big)
    assert packed is not big and offload.pack(big) is packed  # copied once, however often it is saved
    assert torch.equal(offload.unpack(packed), big) and offload.offloaded == 1


def test_the_checkpoints_empty_placeholder_is_small_not_on_another_device():
    """torch's non-reentrant checkpoint (up to 2.12) saves a 0-element CPU placeholder beside each layer's inputs:
    on a GPU the report counted it as "on another device", once per layer and step (run 7 on the H100)."""
    offload = CheckpointOffload(torch.device("cuda:0"), min_bytes=0)  # nothing of CUDA's runs for kept tensors
    placeholder = torch.empty((0,), requires_grad=True)
    assert offload.pack(placeholder) is placeholder
    host_tensor = torch.zeros(1 << 19)
    assert offload.pack(host_tensor) is host_tensor
    assert offload.kept == {"smaller than a copy is worth": 1, "on another device": 1} and offload.offloaded == 0


def test_the_forecasts_fake_step_runs_the_hooks_without_counting():
    """Under FakeTensorMode (memory/forecast.py's fake step) a saved input leaves as a fake host copy and comes back
    as a fake device tensor, so the forecast sees it leave the device; the report counts real steps only."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    offload = CheckpointOffload(torch.device("cpu"), min_bytes=1024)
    with FakeTensorMode():
        assert isinstance(offload.pack(torch.zeros(4)), FakeTensor)  # too small: kept, and not counted
        first, second = torch.zeros(1 << 19), torch.ones(1 << 19)
        packed = [offload.pack(first), offload.pack(second)]
        assert all(p is not t for p, t in zip(packed, (first, second), strict=True))
        back = offload.unpack(packed[1])  # the later layer first, as a backward does: the one before is prefetched
        assert isinstance(back, FakeTensor) and back.shape == second.shape
        assert isinstance(packed[0].loaded, FakeTensor)
        assert offload.unpack(packed[0]) is packed[0].loaded
    assert offload.offloaded == 0 and offload.host_bytes == 0 and offload.peak_host_bytes == 0 and not offload.kept
    real = offload.pack(torch.zeros(1 << 19))  # a real step after a fake one: no link to the fake tensors
    assert real.previous is None and offload.offloaded == 1


def test_the_fake_step_runs_short_of_host_memory_where_a_real_step_would(monkeypatch):
    """A fake step's host copies take no memory, but the real step's would: the host check counts them, so that the
    forecast keeps on the device what the real step would keep there."""
    import types

    from torch._subclasses.fake_tensor import FakeTensorMode

    mib = 1 << 20
    monkeypatch.setattr(
        offload_module.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=(2 << 30) + 3 * mib)
    )
    offload = CheckpointOffload(torch.device("cpu"), min_bytes=0)
    with FakeTensorMode():
        first, second = torch.zeros(mib // 2), torch.zeros(mib // 2)  # 2 MiB each
        kept_first, kept_second = offload.pack(first), offload.pack(second)
        assert kept_first is not first  # 3 MiB above the margin: offloaded
        assert kept_second is second  # 1 MiB left above the margin once the first copy counts: kept
        del first, kept_first  # the backward used the first copy: its memory is the host's again
        gc.collect()
        third = torch.zeros(mib // 2)
        assert offload.pack(third) is not third


def test_refused_before_any_change_where_it_cannot_help():
    model = llama()
    before = model_state.take(model)
    with pytest.raises(ValueError, match=r"offload_checkpoints=True: cpu: the device's memory is the host's"):
        portable_kbit.prepare(model, target_modules=TARGETS, offload_checkpoints=True)
    model_state.assert_unchanged(before, model, "refused offload on the CPU")
    with pytest.raises(ValueError, match="gradient checkpointing is off"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(CpuBackend, "why_no_offload", lambda self, device: None)
            portable_kbit.prepare(
                model, target_modules=TARGETS, offload_checkpoints=True, use_gradient_checkpointing=False
            )
    model_state.assert_unchanged(before, model, "refused offload without checkpointing")
    with pytest.raises(ValueError, match=r"offload_checkpoints='yes' is not valid"):
        portable_kbit.prepare(model, offload_checkpoints="yes")


def test_auto_says_why_it_is_off():
    model = llama()
    portable_kbit.prepare(model, target_modules=TARGETS)  # offload_checkpoints="auto"
    report = portable_kbit.report(model)
    assert not report.offload_checkpoints and report.offload is None
    assert "memory is the host's" in report.offload_reason
    assert "stay on the device" in report.summary()


def test_on_a_gpu_with_its_own_memory_the_inputs_go_to_pinned_host_memory(backend, device):
    """The real path: a side stream, pinned host copies, the same loss and gradients (a discrete CUDA or ROCm GPU)."""
    from portable_kbit import backends

    target = backends.resolve(device)
    if target.backend.why_no_offload(target.device) is not None:
        pytest.skip(f"{target.backend.why_no_offload(target.device)} (the stand-in tests cover the hooks)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(offload_module, "MIN_OFFLOAD_BYTES", 0)
        base = llama().to(device)
        kept = step(copy.deepcopy(base), {"use_reentrant": False}, offload_checkpoints=False)
        moved = step(copy.deepcopy(base), {"use_reentrant": False}, offload_checkpoints=True)
    assert abs(moved[0] - kept[0]) <= 1e-6
    assert all(torch.allclose(moved[1][n], kept[1][n], atol=1e-6) for n in kept[1])
    offload = portable_kbit.report(moved[2].get_base_model()).offload
    assert offload is not None and offload.pin and offload.offloaded >= 3
