"""prepare()'s instance forwards survive transformers' re-kernelization (hub_kernels).

transformers 5.25 kernelizes a model from ``from_pretrained`` (``use_kernels=True`` by default, the ``kernels``
package a dependency) and again in ``train()`` / ``eval()`` when the kernel mode changes; ``kernelize`` removes the
instance forward of every module whose class has a hub kernel name (Llama's RMSNorm), which dropped the frozen norms'
fp32 computation (frozen_norms="compute") on the first ``model.train()`` after prepare().

Two kinds of test: the real thing where the installed transformers kernelizes (skipped, with the reason, where it does
not), and a stand-in for it that runs on every version: a ``set_use_kernels`` that drops every instance forward, as
``kernelize`` does where no hub kernel is found.
"""

from __future__ import annotations

import pytest
import torch
from conftest import bitsandbytes_supports

import portable_kbit
from portable_kbit.patches.protocol import InstanceForward
from portable_kbit.tools import tiny

TARGETS = tiny.LORA_TARGETS["llama"]


def load(backend: str, device: str):
    if not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes 4-bit does not run on {backend}")
    return tiny.load(tiny.checkpoint("llama"), "bnb-nf4", device)


def record_weight_dtypes(monkeypatch, norm_class: type) -> dict[int, torch.dtype]:
    """The dtype of each norm's weight as its own (class) forward sees it, by id of the norm."""
    seen: dict[int, torch.dtype] = {}
    class_forward = norm_class.forward

    def recording(self, *args, **kwargs):
        seen[id(self)] = self.weight.dtype
        return class_forward(self, *args, **kwargs)

    monkeypatch.setattr(norm_class, "forward", recording)
    return seen


def compute_norms(model) -> list[torch.nn.Module]:
    names = portable_kbit.report(model).fp32_compute_norms
    assert names, "the tiny Llama has norms next to adapted layers"
    return [model.get_submodule(name) for name in names]


def test_train_and_eval_keep_the_fp32_norms_where_transformers_kernelizes(backend, device, monkeypatch):
    model = load(backend, device)
    if not getattr(model, "use_kernels", False):
        pytest.skip("this transformers does not kernelize a model from from_pretrained (before 5.25, or no kernels)")
    portable_kbit.prepare(model, device, target_modules=TARGETS)
    norms = compute_norms(model)
    seen = record_weight_dtypes(monkeypatch, type(norms[0]))
    ids = tiny.batch(256, 16, 0, device)

    model.eval()
    model.train()  # kernelizes for inference, then for training: two kernelizations
    with torch.no_grad():
        model(input_ids=ids)
    assert {id(norm): seen.get(id(norm)) for norm in norms} == {id(norm): torch.float32 for norm in norms}
    assert all(isinstance(getattr(norm.forward, "patch", None), InstanceForward) for norm in norms)


class DroppingKernelizer:
    """What transformers 5.25's set_use_kernels does to prepare()'s forwards where no hub kernel is found: kernelize
    pops the instance forward of each module it handles (here: every module)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, use_kernels, *args, **kwargs):
        self.calls += 1
        for module in model.modules():
            module.__dict__.pop("forward", None)


@pytest.fixture
def kernelizer(monkeypatch):
    from transformers import PreTrainedModel

    stand_in = DroppingKernelizer()
    monkeypatch.setattr(
        PreTrainedModel, "set_use_kernels", lambda model, *a, **kw: stand_in(model, *a, **kw), raising=False
    )
    return stand_in


@pytest.mark.parametrize("token_blocks", [None, 8])
def test_forwards_are_put_back_after_a_kernelization(backend, device, kernelizer, token_blocks):
    model = load(backend, device)
    portable_kbit.prepare(model, device, target_modules=TARGETS, token_blocks=token_blocks)
    installed = {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}
    assert installed, "prepare() installs instance forwards here (the fp32 norms, the blocked MLPs)"
    calls = kernelizer.calls  # from_pretrained calls it too, on versions that have it

    model.set_use_kernels(True)

    assert kernelizer.calls == calls + 1
    after = {name: m.__dict__.get("forward") for name, m in model.named_modules() if "forward" in m.__dict__}
    assert after.keys() == installed.keys()
    for name, forward in after.items():
        handle = getattr(forward, "patch", None)
        assert isinstance(handle, InstanceForward) and handle is installed[name].patch, name


def test_a_second_prepare_wraps_the_class_method_once(backend, device, kernelizer):
    model = load(backend, device)
    portable_kbit.prepare(model, device, target_modules=TARGETS)
    portable_kbit.prepare(model, device, target_modules=TARGETS, token_blocks=8)
    calls = kernelizer.calls
    model.set_use_kernels(True)
    assert kernelizer.calls == calls + 1, "one kernelization per call, not one per prepare()"
    blocked = portable_kbit.report(model).blocked_mlps
    assert blocked
    for name in blocked:
        assert isinstance(getattr(model.get_submodule(name).forward, "patch", None), InstanceForward), name


def test_a_failed_kernelization_still_puts_the_forwards_back(backend, device, monkeypatch):
    from transformers import PreTrainedModel

    def drop_then_fail(model, use_kernels, *args, **kwargs):
        for module in model.modules():
            module.__dict__.pop("forward", None)
        raise RuntimeError("kernel download failed")

    model = load(backend, device)
    portable_kbit.prepare(model, device, target_modules=TARGETS)
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", drop_then_fail, raising=False)
    norms = compute_norms(model)
    with pytest.raises(RuntimeError, match="kernel download failed"):
        model.set_use_kernels(True)
    assert all(isinstance(getattr(norm.forward, "patch", None), InstanceForward) for norm in norms)
