"""Per-device accounting: a model split over two GPUs is measured, budgeted, checked, synchronized and released per
device, and the report has each device's memory.

No two GPUs here: a stand-in CUDA backend answers for cuda:0 and cuda:1 with fixed allocator numbers, and a real tiny
CPU model is made to look split (the device_map of tests/test_bad_input.py: embeddings and layer 0 on cuda:0, the rest
on cuda:1) by standing in for the devices prepare() reads: the index's device list and each planned cast's device.
The casts, hooks and undo run on the real CPU tensors. tests/test_bad_input.py runs a real split on two GPUs.
"""

from __future__ import annotations

import dataclasses
import importlib

import model_state
import pytest
import torch
from conftest import planned_changes
from peft import LoraConfig

import portable_kbit
from portable_kbit import backends
from portable_kbit.backends.base import AllocatorStats
from portable_kbit.backends.cuda import CudaBackend
from portable_kbit.constants import MiB
from portable_kbit.model.index import ModelIndex
from portable_kbit.pipeline import devices as accounting
from portable_kbit.pipeline import plan
from portable_kbit.pipeline.cast import chunked, required_bytes
from portable_kbit.tools import tiny

prepare_module = importlib.import_module("portable_kbit.pipeline.prepare")  # portable_kbit.prepare is the function
GiB = 1 << 30
TARGETS = tiny.LORA_TARGETS["llama"]
SPLIT = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
GPUS = [torch.device("cuda", 0), torch.device("cuda", 1)]

# What each stand-in allocator reports before the call (and after it, once the device is released): distinct numbers
# per device and per moment, so that each snapshot shows it was read from the right device at the right time.
BEFORE = {
    0: AllocatorStats(1 * GiB, 2 * GiB, 3 * GiB, 4 * GiB, 10 * GiB, 24 * GiB),
    1: AllocatorStats(5 * GiB, 6 * GiB, 7 * GiB, 8 * GiB, 12 * GiB, 24 * GiB),
}
AFTER = {
    0: AllocatorStats(1 * GiB + 1 * MiB, 2 * GiB, 3 * GiB + 5 * MiB, 4 * GiB, 10 * GiB, 24 * GiB),
    1: AllocatorStats(5 * GiB + 2 * MiB, 6 * GiB, 7 * GiB + 9 * MiB, 8 * GiB, 12 * GiB, 24 * GiB),
}

# Casts exist only where prepare() has something to upcast: every half-precision parameter, the adjacent norms'
# parameters, or the modules trained in full.
CASTING = {
    "upcast=peft": dict(upcast="peft"),
    "frozen_norms=upcast": dict(frozen_norms="upcast", target_modules=TARGETS),
    "modules_to_save": dict(target_modules=LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head"])),
}


class TwoGpus(CudaBackend):
    """A stand-in CUDA backend with two discrete devices; records each call with its device index."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = dict(BEFORE)
        self.calls: list[tuple[str, int]] = []

    def why_unavailable(self):
        return None

    def is_unified(self, device):
        return False

    def allocator_stats(self, device):
        return self.stats[device.index]

    def reset_peak(self, device):
        self.calls.append(("reset_peak", device.index))

    def synchronize(self, device):
        self.calls.append(("synchronize", device.index))

    def release(self, device):
        self.calls.append(("release", device.index))
        self.stats[device.index] = AFTER[device.index]


def standin_device(name: str) -> torch.device:
    """Where the SPLIT device_map puts a parameter."""
    for prefix, index in SPLIT.items():
        if name == prefix or name.startswith(prefix + "."):
            return GPUS[index]
    raise AssertionError(f"{name} is not in the device map")


@pytest.fixture
def two_gpus(monkeypatch) -> TwoGpus:
    backend = TwoGpus()
    monkeypatch.setitem(backends._instances, "cuda", backend)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(ModelIndex, "devices", property(lambda self: list(GPUS)))
    build = plan.build

    def build_on_split(*args, **kwargs):
        changes = build(*args, **kwargs)
        changes.casts = [dataclasses.replace(c, device=standin_device(c.name)) for c in changes.casts]
        return changes

    monkeypatch.setattr(plan, "build", build_on_split)
    return backend


def load():
    return tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu")


def required_on(model, device: torch.device, chunk_bytes: int, **kwargs) -> int:
    """What the casts planned on `device` need, computed here from the plan itself."""
    options = {k: v for k, v in kwargs.items() if k in ("upcast", "target_modules", "frozen_norms")}
    changes = planned_changes(
        model,
        options.get("upcast", "adjacent"),
        options.get("target_modules"),
        options.get("frozen_norms", "compute"),
    )
    return required_bytes(chunked([c for c in changes.casts if c.device == device], chunk_bytes))


def headroom(stats: AllocatorStats) -> int:
    assert stats.device_free is not None and stats.reserved is not None and stats.allocated is not None
    return stats.device_free + stats.reserved - stats.allocated


@pytest.mark.parametrize("casting", list(CASTING))
def test_report_has_each_device_with_its_own_numbers(two_gpus, casting):
    model = load()
    kwargs = CASTING[casting]
    expected = {str(d): required_on(model, d, 4096, **kwargs) for d in GPUS}
    portable_kbit.prepare(model, "auto", chunk_bytes=4096, **kwargs)
    report = portable_kbit.report(model)

    assert report.backend == "cuda" and report.device == "cuda:0"
    assert list(report.devices) == ["cuda:0", "cuda:1"]
    assert expected["cuda:1"] > 0  # lm_head (and the last layer's norms) live there
    for index, (device, share) in enumerate(report.devices.items()):
        assert share.before.device == share.after.device == share.peak.device == device
        assert share.before.allocated == BEFORE[index].allocated
        assert share.before.headroom == headroom(BEFORE[index])
        assert share.after.allocated == AFTER[index].allocated
        assert share.peak.allocated == AFTER[index].peak_allocated  # the allocator's own peak, of this device
        assert share.required_bytes == expected[device]
        assert share.chunk_bytes == 4096 and (share.chunks > 0) == (expected[device] > 0)
    # the top-level fields: the first device's memory; totals of what was needed and done
    assert report.before == report.devices["cuda:0"].before and report.peak == report.devices["cuda:0"].peak
    assert report.headroom_bytes == headroom(BEFORE[0])
    assert report.required_bytes == sum(expected.values())
    assert report.chunks == sum(share.chunks for share in report.devices.values())
    assert set(report.to_dict()["devices"]) == {"cuda:0", "cuda:1"}
    assert "cuda:1:" in report.summary()
    # each device's peak window opened before, synchronized, then released, once each, after all the casts
    assert two_gpus.calls == [
        ("reset_peak", 0),
        ("reset_peak", 1),
        ("synchronize", 0),
        ("synchronize", 1),
        ("release", 0),
        ("release", 1),
    ]


def test_each_device_budgets_its_chunks_against_its_own_headroom(two_gpus):
    """A device short of memory gets smaller chunks; the other keeps the backend's default."""
    two_gpus.stats[1] = AllocatorStats(5 * GiB, 5 * GiB, 5 * GiB, 5 * GiB, 64 * MiB, 24 * GiB)  # 64 MiB free
    model = load()
    portable_kbit.prepare(model, "auto", upcast="peft")
    report = portable_kbit.report(model)
    default = two_gpus.chunk_budget(None, unified=False)
    assert report.devices["cuda:0"].chunk_bytes == default
    assert report.devices["cuda:1"].chunk_bytes == two_gpus.chunk_budget(64 * MiB, unified=False) < default
    assert report.chunk_bytes == report.devices["cuda:1"].chunk_bytes  # the smallest (it sizes lm_head's blocks)
    assert report.chunk_bytes_source == "shrunk by memory pressure"


@pytest.mark.parametrize("short", [0, 1])
@pytest.mark.parametrize("casting", list(CASTING))
def test_a_device_short_of_headroom_is_named_and_nothing_changes(two_gpus, casting, short):
    model = load()
    kwargs = CASTING[casting]
    need = required_on(model, GPUS[short], 4096, **kwargs)
    if need == 0:
        pytest.skip(f"{casting}: no cast on {GPUS[short]} (modules_to_save is lm_head alone)")
    stats = BEFORE[short]
    # that device has a byte less than its casts need; the other one has gigabytes
    two_gpus.stats[short] = dataclasses.replace(stats, device_free=need - 1 - (stats.reserved - stats.allocated))
    before = model_state.take(model)
    with pytest.raises(portable_kbit.MemoryPressureError, match=rf"on cuda:{short} but only") as raised:
        portable_kbit.prepare(model, "auto", chunk_bytes=4096, **kwargs)
    error = raised.value
    assert (error.device, error.required, error.headroom) == (f"cuda:{short}", need, need - 1)
    assert "Give that device less of the model" in str(error) and "not changed" in str(error)
    assert not getattr(error, "__notes__", None)  # refused before the first change: nothing to restore
    model_state.assert_unchanged(before, model, f"cuda:{short} short of headroom")
    assert portable_kbit.report(model) is None
    assert [name for name, _ in two_gpus.calls] == ["reset_peak", "reset_peak"]  # no synchronize, no release


def test_one_device_model_reports_that_device():
    model = load()
    portable_kbit.prepare(model, "cpu", upcast="peft")
    report = portable_kbit.report(model)
    assert list(report.devices) == ["cpu"]
    share = report.devices["cpu"]
    assert (share.before, share.after, share.peak) == (report.before, report.after, report.peak)
    assert share.required_bytes == report.required_bytes > 0 and share.chunks == report.chunks


def test_a_moved_model_is_accounted_on_the_device_it_moves_to():
    """A CPU model asked onto an accelerator: one share, on that device, needing the model's bytes too."""
    targets = accounting.device_targets(backends.Target(TwoGpus(), GPUS[1]), [torch.device("cpu")], move_to=GPUS[1])
    assert [t.device for t in targets] == [GPUS[1]]
    cast = plan.ParamCast(
        "w", torch.nn.Linear(1, 1), "weight", torch.bfloat16, torch.float32, 256, torch.device("cpu")
    )
    befores = [dataclasses.replace(portable_kbit.snapshot("cpu"), device="cuda:1")]
    shares = accounting.share_casts(targets, befores, [cast], chunk_bytes=4096, moved_bytes=1000)
    assert len(shares) == 1 and shares[0].chunks == [[cast]]
    assert shares[0].required == 1000 + 256 * 4  # the model moved, plus the cast's fp32 growth and its old bytes
