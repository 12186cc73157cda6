"""Contract tests for the device backends, with the device APIs stood in for by monkeypatch (no hardware needed).

What each backend must read, from where, on which torch version (see shared/notes/backend-facts.md):
- MPS: torch.mps.* always; torch.accelerator's memory API only from torch 2.13 (it raises before);
- ROCm: a HIP build keeps torch's device type "cuda"; APUs take "free" from the host (psutil), discrete GPUs from HIP;
- CUDA: Jetson (is_integrated) takes "free" from the host; torch 2.5 has no torch.accelerator at all;
- resolve(): clear errors; MemoryPressureError raised before the model is touched.
"""

from __future__ import annotations

import collections
import types

import psutil
import pytest
import torch
from conftest import bitsandbytes_supports

import portable_kbit
from portable_kbit import backends
from portable_kbit.backends import BackendUnavailableError
from portable_kbit.backends import mps as mps_module
from portable_kbit.constants import MiB
from portable_kbit.model.hf import is_checkpointing
from portable_kbit.pipeline import devices as accounting
from portable_kbit.tools import tiny

GiB = 1 << 30
HOST_AVAILABLE = 9 * GiB
HOST_TOTAL = 32 * GiB


# ---- stand-ins ------------------------------------------------------------------------------------------------------


class Calls(collections.Counter):
    """Counts calls to stand-in functions by name."""

    def wrap(self, name, result):
        def function(*args, **kwargs):
            self[name] += 1
            if isinstance(result, BaseException):
                raise result
            return result() if callable(result) else result

        return function


@pytest.fixture
def host(monkeypatch):
    """psutil.virtual_memory() reports HOST_AVAILABLE of HOST_TOTAL (a mutable namespace: tests may change it)."""
    virtual = types.SimpleNamespace(available=HOST_AVAILABLE, total=HOST_TOTAL, percent=0.0)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: virtual)
    return virtual


ACCELERATOR_MEMORY = (
    "memory_allocated",
    "memory_reserved",
    "max_memory_allocated",
    "max_memory_reserved",
    "reset_peak_memory_stats",
    "get_memory_info",
    "empty_cache",
    "empty_host_cache",
    "memory_stats",
)


def hide_accelerator(monkeypatch):
    """torch 2.5: no torch.accelerator module at all."""
    monkeypatch.delattr(torch, "accelerator", raising=False)
    assert not hasattr(torch, "accelerator")


def stand_in_accelerator(monkeypatch, calls: Calls, results: dict):
    """Replace torch.accelerator's memory functions; a name missing from `results` raises AssertionError if called."""
    if not hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch, "accelerator", types.SimpleNamespace(), raising=False)
    for name in ACCELERATOR_MEMORY:
        result = results.get(name, AssertionError(f"torch.accelerator.{name} must not be called here"))
        monkeypatch.setattr(torch.accelerator, name, calls.wrap(f"accelerator.{name}", result), raising=False)


# ---- MPS ------------------------------------------------------------------------------------------------------------

MPS_CURRENT = 2 * GiB
MPS_DRIVER = 5 * GiB
MPS_RECOMMENDED = 20 * GiB
MPS_ACCELERATOR_ALLOCATED = 3 * GiB
MPS_ACCELERATOR_PEAK = 4 * GiB
NOT_A_DEVICE_ALLOCATOR = RuntimeError("Allocator for mps is not a DeviceAllocator")


@pytest.fixture
def fake_mps(monkeypatch, host):
    """An Apple Silicon machine: torch.mps and torch.backends.mps stood in for; returns (calls, set_version)."""
    calls = Calls()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", calls.wrap("mps.current_allocated_memory", MPS_CURRENT))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", calls.wrap("mps.driver_allocated_memory", MPS_DRIVER))
    monkeypatch.setattr(torch.mps, "recommended_max_memory", calls.wrap("mps.recommended_max_memory", MPS_RECOMMENDED))
    monkeypatch.setattr(torch.mps, "empty_cache", calls.wrap("mps.empty_cache", None))
    monkeypatch.setattr(torch.mps, "synchronize", calls.wrap("mps.synchronize", None))

    def set_version(version: tuple[int, int]):
        monkeypatch.setattr(mps_module, "torch_version", lambda: version)
        if version >= (2, 13):
            results = {
                "memory_allocated": MPS_ACCELERATOR_ALLOCATED,
                "max_memory_allocated": MPS_ACCELERATOR_PEAK,
                "memory_reserved": MPS_DRIVER,
                "max_memory_reserved": MPS_DRIVER,
                "reset_peak_memory_stats": None,
                "get_memory_info": (MPS_RECOMMENDED - MPS_DRIVER, MPS_RECOMMENDED),
                "empty_cache": None,
                # empty_host_cache segfaults on MPS 2.13 when nothing was allocated yet: left raising on purpose
            }
        elif version >= (2, 9):
            results = {name: NOT_A_DEVICE_ALLOCATOR for name in ACCELERATOR_MEMORY}
        else:
            hide_accelerator(monkeypatch)
            return
        stand_in_accelerator(monkeypatch, calls, results)

    return calls, set_version


def accelerator_calls(calls: Calls) -> dict:
    return {name: n for name, n in calls.items() if name.startswith("accelerator.") and n}


def test_mps_is_available_when_torch_says_so(fake_mps):
    _calls, set_version = fake_mps
    set_version((2, 12))
    assert "mps" in portable_kbit.available_backends()
    target = backends.resolve("mps")
    assert target.backend.name == "mps" and target.device == torch.device("mps")
    with pytest.raises(ValueError, match="index"):
        backends.resolve("mps:1")


def test_mps_before_2_13_uses_torch_mps_only(fake_mps):
    calls, set_version = fake_mps
    set_version((2, 12))  # torch.accelerator's memory functions raise "not a DeviceAllocator" on MPS here
    backend = backends.get("mps")
    device = torch.device("mps")
    stats = backend.allocator_stats(device)
    backend.reset_peak(device)
    backend.release(device)
    assert accelerator_calls(calls) == {}, "torch.accelerator memory functions called on MPS before torch 2.13"
    assert stats.allocated == MPS_CURRENT
    assert stats.reserved == MPS_DRIVER
    assert stats.device_total == MPS_RECOMMENDED
    assert stats.device_free == MPS_RECOMMENDED - MPS_DRIVER
    assert stats.peak_allocated is None
    assert any("no peak API" in note for note in stats.notes)
    assert calls["mps.current_allocated_memory"] >= 1
    assert calls["mps.driver_allocated_memory"] >= 1
    assert calls["mps.recommended_max_memory"] >= 1


def test_mps_from_2_13_uses_torch_accelerator(fake_mps):
    calls, set_version = fake_mps
    set_version((2, 13))
    backend = backends.get("mps")
    device = torch.device("mps")
    stats = backend.allocator_stats(device)
    assert calls["accelerator.memory_allocated"] >= 1
    assert stats.allocated == MPS_ACCELERATOR_ALLOCATED
    assert stats.peak_allocated == MPS_ACCELERATOR_PEAK
    assert not any("no peak API" in note for note in stats.notes)
    # the driver's total (cache included) is still the reserved figure, and free is measured against Metal's limit
    assert stats.reserved == MPS_DRIVER
    assert stats.device_free == MPS_RECOMMENDED - MPS_DRIVER
    assert stats.device_total == MPS_RECOMMENDED
    backend.reset_peak(device)
    assert calls["accelerator.reset_peak_memory_stats"] == 1
    backend.release(device)
    assert calls["accelerator.empty_host_cache"] == 0  # segfaults on MPS 2.13


def test_mps_on_torch_2_5_without_torch_accelerator(fake_mps):
    _calls, set_version = fake_mps
    set_version((2, 5))
    stats = backends.get("mps").allocator_stats(torch.device("mps"))
    assert (stats.allocated, stats.reserved, stats.device_total) == (MPS_CURRENT, MPS_DRIVER, MPS_RECOMMENDED)
    snap = portable_kbit.snapshot("mps")
    assert snap.allocated == MPS_CURRENT


def test_mps_release_and_synchronize_call_torch_mps_once(fake_mps):
    calls, set_version = fake_mps
    set_version((2, 12))
    backend = backends.get("mps")
    backend.synchronize(torch.device("mps"))
    backend.release(torch.device("mps"))
    assert calls["mps.empty_cache"] == 1
    assert calls["mps.synchronize"] == 1


def test_mps_release_tolerates_unavailable_metal(fake_mps, monkeypatch):
    calls, set_version = fake_mps
    set_version((2, 12))
    monkeypatch.setattr(torch.mps, "empty_cache", calls.wrap("mps.empty_cache", RuntimeError("no MPS backend")))
    backends.get("mps").release(torch.device("mps"))  # must not raise
    assert calls["mps.empty_cache"] == 1


@pytest.mark.parametrize("host_available", [9 * GiB, 30 * GiB], ids=["host-tighter", "metal-tighter"])
def test_mps_snapshot_is_unified_with_rss_note_and_headroom(fake_mps, host, host_available):
    _calls, set_version = fake_mps
    set_version((2, 12))
    host.available = host_available
    snap = portable_kbit.snapshot("mps")
    assert snap.backend == "mps" and snap.device == "mps"
    assert snap.unified is True
    assert any("rss" in note.lower() and "metal" in note.lower() for note in snap.notes), snap.notes
    assert snap.allocated == MPS_CURRENT and snap.reserved == MPS_DRIVER
    assert snap.host_available == host_available and snap.host_total == HOST_TOTAL
    device_free = MPS_RECOMMENDED - MPS_DRIVER
    assert snap.device_free == device_free
    assert snap.headroom == min(device_free, host_available) + (MPS_DRIVER - MPS_CURRENT)


# ---- CUDA / ROCm ----------------------------------------------------------------------------------------------------

CUDA_FREE = 6 * GiB  # what cudaMemGetInfo / hipMemGetInfo says (under-reports on integrated GPUs)
CUDA_TOTAL = 16 * GiB
CUDA_ALLOCATED = 1 * GiB
CUDA_RESERVED = 1 * GiB + 512 * MiB
CUDA_PEAK_ALLOCATED = 2 * GiB
CUDA_PEAK_RESERVED = 3 * GiB


def fake_cuda(monkeypatch, *, hip=None, integrated=False, accelerator="present") -> Calls:
    """One CUDA (or HIP) device. accelerator: "present" (torch >= 2.10), "raising" (refuses), "absent" (torch 2.5)."""
    calls = Calls()
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    properties = types.SimpleNamespace(name="stand-in GPU", total_memory=CUDA_TOTAL, is_integrated=integrated)
    monkeypatch.setattr(torch.cuda, "get_device_properties", calls.wrap("cuda.get_device_properties", properties))
    values = {
        "memory_allocated": CUDA_ALLOCATED,
        "memory_reserved": CUDA_RESERVED,
        "max_memory_allocated": CUDA_PEAK_ALLOCATED,
        "max_memory_reserved": CUDA_PEAK_RESERVED,
        "mem_get_info": (CUDA_FREE, CUDA_TOTAL),
        "reset_peak_memory_stats": None,
        "empty_cache": None,
        "synchronize": None,
    }
    for name, value in values.items():
        monkeypatch.setattr(torch.cuda, name, calls.wrap(f"cuda.{name}", value))
    if accelerator == "absent":
        hide_accelerator(monkeypatch)
    elif accelerator == "raising":
        stand_in_accelerator(monkeypatch, calls, {name: RuntimeError("refused") for name in ACCELERATOR_MEMORY})
    else:
        results = {name: value for name, value in values.items() if name in ACCELERATOR_MEMORY}
        results["get_memory_info"] = (CUDA_FREE, CUDA_TOTAL)
        stand_in_accelerator(monkeypatch, calls, results)
    return calls


def test_rocm_build_is_detected_as_rocm(monkeypatch, host):
    fake_cuda(monkeypatch, hip="6.2.41133", integrated=False)
    names = portable_kbit.available_backends()
    assert names[0] == "rocm" and "cuda" not in names and names[-1] == "cpu"
    target = backends.resolve("rocm")
    assert target.backend.name == "rocm"
    assert target.device.type == "cuda"  # torch keeps the device type "cuda" on ROCm
    assert backends.resolve("rocm:0").device == torch.device("cuda", 0)
    assert backends.resolve("auto").backend.name == "rocm"
    # a model already on a "cuda" device of a HIP build belongs to the rocm backend
    assert backends.resolve("auto", torch.device("cuda", 0)).backend.name == "rocm"
    assert backends.for_device(torch.device("cuda", 0)).name == "rocm"


def test_cuda_request_on_rocm_build_points_to_rocm(monkeypatch, host):
    fake_cuda(monkeypatch, hip="6.2.41133", integrated=False)
    try:
        target = backends.resolve("cuda")
    except BackendUnavailableError as error:  # today: refused, with a message that names the right device
        assert "rocm" in str(error)
    else:  # or taken as the ROCm device it means; never as the NVIDIA backend
        assert target.backend.name == "rocm"


def test_rocm_apu_takes_free_memory_from_the_host(monkeypatch, host):
    fake_cuda(monkeypatch, hip="6.2.41133", integrated=True)
    backend = backends.get("rocm")
    device = torch.device("cuda", 0)
    assert backend.is_unified(device) is True
    stats = backend.allocator_stats(device)
    assert stats.device_free == HOST_AVAILABLE != CUDA_FREE
    assert stats.device_total == CUDA_TOTAL
    assert any("APU" in note for note in stats.notes)
    snap = portable_kbit.snapshot("rocm")
    assert snap.unified is True
    assert snap.device_free == HOST_AVAILABLE
    assert snap.headroom == HOST_AVAILABLE + (CUDA_RESERVED - CUDA_ALLOCATED)


def test_rocm_discrete_takes_free_memory_from_hip(monkeypatch, host):
    fake_cuda(monkeypatch, hip="6.2.41133", integrated=False)
    backend = backends.get("rocm")
    device = torch.device("cuda", 0)
    assert backend.is_unified(device) is False
    stats = backend.allocator_stats(device)
    assert stats.device_free == CUDA_FREE
    assert stats.device_total == CUDA_TOTAL
    assert not any("APU" in note for note in stats.notes)
    snap = portable_kbit.snapshot("rocm")
    assert snap.unified is False
    assert snap.headroom == CUDA_FREE + (CUDA_RESERVED - CUDA_ALLOCATED)  # the host does not limit a discrete GPU


@pytest.mark.parametrize("name, hip", [("rocm", "6.2.41133"), ("cuda", None)])
def test_chunk_budget_is_smaller_on_unified_memory(monkeypatch, host, name, hip):
    host.available = 64 * GiB  # plenty: the defaults apply
    budgets = {}
    for integrated in (False, True):
        fake_cuda(monkeypatch, hip=hip, integrated=integrated)
        target = backends.resolve(name)
        before = portable_kbit.snapshot(name)
        assert before.unified is integrated
        budgets[integrated], _ = accounting.chunk_budget(target, before, None)
    assert budgets[True] < budgets[False]
    backend = backends.get(name)
    # the same measured headroom gives a smaller chunk on shared memory, and shrinks under pressure
    for headroom in (None, 1 * GiB, 256 * MiB):
        assert backend.chunk_budget(headroom, unified=True) < backend.chunk_budget(headroom, unified=False)
    assert backend.chunk_budget(256 * MiB, unified=True) < backend.chunk_budget(None, unified=True)
    assert backend.chunk_budget(1, unified=True) == backend.min_chunk_bytes


@pytest.mark.parametrize("accelerator", ["present", "absent"])
def test_jetson_takes_free_memory_from_the_host(monkeypatch, host, accelerator):
    fake_cuda(monkeypatch, hip=None, integrated=True, accelerator=accelerator)
    assert portable_kbit.available_backends()[0] == "cuda"
    backend = backends.get("cuda")
    device = torch.device("cuda", 0)
    assert backend.is_unified(device) is True
    stats = backend.allocator_stats(device)
    assert stats.device_free == HOST_AVAILABLE != CUDA_FREE  # cudaMemGetInfo under-reports on Jetson
    assert stats.device_total == CUDA_TOTAL
    assert stats.notes, "the unified-memory rule should be noted"
    snap = portable_kbit.snapshot("cuda:0")
    assert snap.unified is True and snap.device == "cuda:0"
    assert snap.device_free == HOST_AVAILABLE


def test_discrete_cuda_prefers_torch_accelerator(monkeypatch, host):
    calls = fake_cuda(monkeypatch, hip=None, integrated=False, accelerator="present")
    stats = backends.get("cuda").allocator_stats(torch.device("cuda", 0))
    assert (stats.allocated, stats.reserved, stats.device_free, stats.device_total) == (
        CUDA_ALLOCATED,
        CUDA_RESERVED,
        CUDA_FREE,
        CUDA_TOTAL,
    )
    assert calls["accelerator.memory_allocated"] >= 1 and calls["accelerator.get_memory_info"] >= 1
    assert calls["cuda.memory_allocated"] == 0 and calls["cuda.mem_get_info"] == 0


@pytest.mark.parametrize("accelerator", ["absent", "raising"], ids=["torch-2.5", "accelerator-refuses"])
def test_cuda_falls_back_to_torch_cuda(monkeypatch, host, accelerator):
    calls = fake_cuda(monkeypatch, hip=None, integrated=False, accelerator=accelerator)
    backend = backends.get("cuda")
    device = torch.device("cuda", 0)
    stats = backend.allocator_stats(device)
    assert stats.allocated == CUDA_ALLOCATED
    assert stats.reserved == CUDA_RESERVED
    assert stats.peak_allocated == CUDA_PEAK_ALLOCATED
    assert stats.peak_reserved == CUDA_PEAK_RESERVED
    assert (stats.device_free, stats.device_total) == (CUDA_FREE, CUDA_TOTAL)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved", "mem_get_info"):
        assert calls[f"cuda.{name}"] >= 1, f"torch.cuda.{name} was not used"
    backend.reset_peak(device)
    if accelerator == "absent":
        assert calls["cuda.reset_peak_memory_stats"] == 1
    backend.release(device)
    assert calls["cuda.empty_cache"] == 1
    snap = portable_kbit.snapshot("cuda")
    assert snap.allocated == CUDA_ALLOCATED and snap.unified is False


def test_cpu_snapshot_without_torch_accelerator(monkeypatch):
    hide_accelerator(monkeypatch)
    snap = portable_kbit.snapshot("cpu")
    assert snap.backend == "cpu" and snap.device == "cpu"
    assert snap.process_rss > 0 and snap.host_available > 0 and snap.host_total >= snap.host_available
    assert snap.headroom is not None and snap.headroom > 0
    assert portable_kbit.available_backends()[-1] == "cpu"


# ---- resolve() ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", ["tpu", "gpu:0", "cuda:x", ""])
def test_unknown_device_names_the_accepted_ones(request_):
    with pytest.raises(ValueError) as caught:
        backends.resolve(request_)
    message = str(caught.value)
    for accepted in ("'auto'", "'cuda'", "'rocm'", "'mps'", "'cpu'"):
        assert accepted in message, f"{accepted} missing from: {message}"


def test_unavailable_mps_lists_what_is_available():
    available = portable_kbit.available_backends()
    if "mps" in available:
        pytest.skip("MPS is available on this machine")
    with pytest.raises(BackendUnavailableError) as caught:
        backends.resolve("mps")
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    for name in available:
        assert name in message, message
    with pytest.raises(BackendUnavailableError):
        portable_kbit.snapshot("mps")


def test_missing_device_index(monkeypatch, host):
    fake_cuda(monkeypatch, hip=None)
    with pytest.raises(BackendUnavailableError, match="1"):
        backends.resolve("cuda:3")
    assert backends.resolve("cuda:0").device == torch.device("cuda", 0)


def test_available_backends_ends_with_cpu():
    names = portable_kbit.available_backends()
    assert names[-1] == "cpu"
    assert names.count("cpu") == 1
    assert backends.resolve("auto").backend.name == names[0]


# ---- MemoryPressureError: refused before any change --------------------------------------------------------------


def load_model(backend: str, device: str):
    quantizer = "bnb-nf4" if bitsandbytes_supports(backend) else "quanto-int4"
    return tiny.load(tiny.checkpoint("llama"), quantizer, device)


def model_state(model) -> dict:
    """Everything prepare() could change: parameter objects, raw bytes, dtypes, grads flags, hooks, modes."""
    state = {}
    for name, p in model.named_parameters():
        data = p.detach()
        raw = data.reshape(-1).contiguous().view(torch.uint8).clone() if type(data) is torch.Tensor else None
        quant_state = getattr(p, "quant_state", None)
        absmax = quant_state.absmax.clone() if quant_state is not None else None
        if type(data) is torch.Tensor:
            value = p.detach().float().clone() if p.is_floating_point() else None
        else:  # an optimum-quanto QTensor: compare what it stands for
            value = data.dequantize().float().clone()
        state[name] = (p, p.dtype, p.requires_grad, raw, absmax, value)
    hooks = {
        name: tuple(len(getattr(m, attr)) for attr in ("_forward_hooks", "_forward_pre_hooks"))
        for name, m in model.named_modules()
    }
    training = {name: m.training for name, m in model.named_modules()}
    checkpointing = is_checkpointing(model)
    input_hook = bool(model.__dict__.get("_require_grads_hooks")) or model.__dict__.get("_require_grads_hook")
    return {
        "params": state,
        "hooks": hooks,
        "training": training,
        "checkpointing": checkpointing,
        "input_hook": bool(input_hook),
    }


def assert_same_state(before: dict, after: dict):
    assert before["params"].keys() == after["params"].keys()
    for name, (p0, dtype0, grad0, raw0, absmax0, value0) in before["params"].items():
        p1, dtype1, grad1, raw1, absmax1, value1 = after["params"][name]
        assert p1 is p0, f"{name} replaced"
        assert dtype1 == dtype0, f"{name}: dtype {dtype0} -> {dtype1}"
        assert grad1 == grad0, f"{name}: requires_grad {grad0} -> {grad1}"
        if raw0 is not None:
            assert torch.equal(raw1, raw0), f"{name}: bytes changed"
        if absmax0 is not None:
            assert torch.equal(absmax1, absmax0), f"{name}: quant_state.absmax changed"
        if value0 is not None:
            assert torch.equal(value1, value0), f"{name}: value changed"
    assert after["hooks"] == before["hooks"]
    assert after["training"] == before["training"]
    assert after["checkpointing"] == before["checkpointing"]
    assert after["input_hook"] == before["input_hook"]


@pytest.mark.parametrize("upcast", ["adjacent", "peft"])
def test_memory_pressure_refuses_before_any_change(backend, device, monkeypatch, upcast):
    # frozen_norms="upcast": the adjacent norms' parameters are cast, which needs memory
    model = load_model(backend, device)
    before = model_state(model)
    assert any(grad for _, _, grad, *_ in before["params"].values())  # freezing would show
    monkeypatch.setattr(backends.get(backend), "headroom", lambda device, stats, host_available: 100)

    with pytest.raises(portable_kbit.MemoryPressureError) as caught:
        portable_kbit.prepare(
            model,
            backend,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            upcast=upcast,
            frozen_norms="upcast",
        )
    error = caught.value
    assert error.headroom == 100
    assert error.required > 100
    assert "not changed" in str(error)
    assert_same_state(before, model_state(model))
    assert portable_kbit.report(model) is None


def test_the_default_needs_no_memory_even_under_pressure(backend, device, monkeypatch):
    """The default computes the adjacent norms in fp32 at call time: nothing to allocate, so no headroom is needed."""
    model = load_model(backend, device)
    monkeypatch.setattr(backends.get(backend), "headroom", lambda device, stats, host_available: 100)
    portable_kbit.prepare(model, backend, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    report = portable_kbit.report(model)
    assert report.required_bytes == 0 and report.upcast == [] and report.fp32_compute_norms


def test_memory_pressure_from_measured_host_memory(backend, device, monkeypatch):
    """On unified memory the host's available memory is the limit: a nearly full host refuses the casts."""
    backend_object = backends.get(backend)
    model = load_model(backend, device)
    if not backend_object.is_unified(next(model.parameters()).device):
        pytest.skip("the host's memory limits only unified-memory devices")
    before = model_state(model)
    virtual = types.SimpleNamespace(available=512, total=HOST_TOTAL, percent=100.0)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: virtual)
    with pytest.raises(portable_kbit.MemoryPressureError):
        portable_kbit.prepare(model, backend, upcast="peft")
    assert_same_state(before, model_state(model))
    assert portable_kbit.report(model) is None


# ---- memory_guard: caps through the Backend ---------------------------------------------------------------------


class FractionCalls(list):
    """Records (fraction, device) of every allocator cap set through a stand-in."""

    def setter(self, *args):
        self.append(args)


@pytest.fixture
def cuda_caps(monkeypatch):
    """torch.cuda's per-process fraction stood in for: a getter that returns what was set last (1.0 at first)."""
    calls = FractionCalls()
    current = {"fraction": 1.0}

    def set_fraction(fraction, device=None):
        calls.setter(fraction, device)
        current["fraction"] = fraction

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: current["fraction"])
    for name in ("cuda", "rocm"):
        monkeypatch.setattr(backends.get(name), "_fractions", {})
    return calls


@pytest.fixture
def mps_caps(monkeypatch, fake_mps):
    _calls, set_version = fake_mps
    set_version((2, 12))
    calls = FractionCalls()
    monkeypatch.setattr(torch.mps, "set_per_process_memory_fraction", lambda fraction: calls.setter(fraction))
    monkeypatch.setattr(backends.get("mps"), "_fraction", None)
    monkeypatch.delenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", raising=False)
    return calls


def test_guard_on_a_discrete_gpu_is_a_fraction_of_the_device_and_restores(monkeypatch, host, cuda_caps):
    fake_cuda(monkeypatch, hip=None, integrated=False)
    with portable_kbit.memory_guard(0.5, "cuda") as guard:
        assert guard.capped and guard.previous == 1.0
        assert guard.allocator_fraction == 0.5 and guard.cap_bytes == CUDA_TOTAL // 2
        assert cuda_caps == [(0.5, 0)]
    assert cuda_caps == [(0.5, 0), (1.0, 0)]
    guard.restore()  # once only
    assert len(cuda_caps) == 2


def test_guard_as_a_plain_call_returns_the_previous_setting_and_nests(monkeypatch, host, cuda_caps):
    fake_cuda(monkeypatch, hip=None, integrated=False)
    outer = portable_kbit.memory_guard(0.8, "cuda:0")
    assert outer.previous == 1.0 and cuda_caps[-1] == (0.8, 0)
    with portable_kbit.memory_guard(cap_bytes=4 * GiB, device="cuda") as inner:
        assert inner.previous == 0.8 and inner.allocator_fraction == 0.25 and inner.cap_bytes == 4 * GiB
    assert cuda_caps[-1] == (0.8, 0)  # the outer cap is back
    outer.restore()
    assert cuda_caps[-1] == (1.0, 0)


def test_guard_without_a_fraction_getter_restores_what_it_set(monkeypatch, host, cuda_caps):
    """torch before get_per_process_memory_fraction: the backend remembers what it set (1.0 at first)."""
    fake_cuda(monkeypatch, hip=None, integrated=False, accelerator="absent")
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    with portable_kbit.memory_guard(0.6, "cuda"):
        with portable_kbit.memory_guard(0.3, "cuda") as inner:
            assert inner.previous == 0.6
        assert cuda_caps[-1] == (0.6, 0)
    assert cuda_caps[-1] == (1.0, 0)


@pytest.mark.parametrize("name, hip", [("cuda", None), ("rocm", "6.2.41133")], ids=["jetson", "rocm-apu"])
def test_guard_on_unified_memory_is_sized_from_the_host(monkeypatch, host, cuda_caps, name, hip):
    fake_cuda(monkeypatch, hip=hip, integrated=True)
    # 0.9 of the host's 32 GiB would run into swap: the cap stops at available (9 GiB) + what the allocator holds
    with portable_kbit.memory_guard(0.9, name) as guard:
        assert guard.cap_bytes == HOST_AVAILABLE + CUDA_RESERVED
        assert guard.allocator_fraction == pytest.approx((HOST_AVAILABLE + CUDA_RESERVED) / CUDA_TOTAL)
    host.available = 31 * GiB  # plenty available: 0.25 of the host's total
    with portable_kbit.memory_guard(0.25, name) as guard:
        assert guard.cap_bytes == 8 * GiB and guard.allocator_fraction == 0.5
    host.available = 30 * GiB  # more than the device reports (an APU's aperture): capped at the device's total
    with portable_kbit.memory_guard(0.9, name) as guard:
        assert guard.cap_bytes == CUDA_TOTAL and guard.allocator_fraction == 1.0
    assert cuda_caps[-1] == (1.0, 0)


def test_guard_on_a_discrete_rocm_gpu_is_a_fraction_of_the_device(monkeypatch, host, cuda_caps):
    fake_cuda(monkeypatch, hip="6.2.41133", integrated=False)
    with portable_kbit.memory_guard(0.75, "rocm") as guard:
        assert guard.backend == "rocm" and guard.cap_bytes == int(0.75 * CUDA_TOTAL)
        assert cuda_caps == [(0.75, 0)]


def test_guard_on_mps_uses_metal_working_set_and_restores_the_high_watermark(monkeypatch, mps_caps):
    with portable_kbit.memory_guard(0.8, "mps") as guard:
        assert guard.capped and guard.previous == 1.7  # torch's default high watermark ratio
        assert guard.cap_bytes == int(0.8 * MPS_RECOMMENDED) and guard.allocator_fraction == 0.8
        assert mps_caps == [(0.8,)]
    assert mps_caps == [(0.8,), (1.7,)]
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "1.3")
    monkeypatch.setattr(backends.get("mps"), "_fraction", None)
    with portable_kbit.memory_guard(0.5, "mps") as guard:
        assert guard.previous == 1.3
    assert mps_caps[-1] == (1.3,)


def test_guard_on_the_cpu_says_it_cannot_cap():
    with pytest.warns(portable_kbit.CannotCapWarning, match="cannot cap"):
        guard = portable_kbit.memory_guard(0.9, "cpu")
    assert not guard.capped and guard.previous is None and guard.cap_bytes is None
    with guard:  # still a context manager, and restoring does nothing
        pass
    assert guard.restored


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, 2, True, "0.9", None])
def test_guard_refuses_a_fraction_outside_0_1(monkeypatch, host, cuda_caps, fraction):
    fake_cuda(monkeypatch, hip=None, integrated=False)
    with pytest.raises(ValueError, match=r"fraction=.* must be a number in \(0, 1\]"):
        portable_kbit.memory_guard(fraction, "cuda")
    assert cuda_caps == []


@pytest.mark.parametrize("cap", [0, -1, 1.5, True])
def test_guard_refuses_cap_bytes_that_are_not_positive_ints(monkeypatch, host, cuda_caps, cap):
    fake_cuda(monkeypatch, hip=None, integrated=False)
    with pytest.raises(ValueError, match=r"cap_bytes=.* must be a positive int"):
        portable_kbit.memory_guard(device="cuda", cap_bytes=cap)
    assert cuda_caps == []


def test_compare_caps_through_the_backend(monkeypatch, host, cuda_caps, mps_caps):
    from portable_kbit.tools import compare

    fake_cuda(monkeypatch, hip=None, integrated=False)
    compare.cap_memory(backends.resolve("cuda"), 0.1)
    assert cuda_caps == [(0.1, 0)]
    compare.cap_memory(backends.resolve("mps"), 0.5)
    assert mps_caps == [(0.5,)]
    with pytest.raises(ValueError, match=r"can cap its allocator"):
        compare.cap_memory(backends.resolve("cpu"), 0.5)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        compare.cap_memory(backends.resolve("cuda"), 1.5)


# ---- quantizer preference: the Backend's ------------------------------------------------------------------------


def test_quantizer_preference_comes_from_the_backend(monkeypatch):
    from portable_kbit.backends.cpu import CpuBackend
    from portable_kbit.tools import quantizer_probe as quantizers

    assert quantizers.preference("mps") == backends.get("mps").preferred_quantizers == ("quanto-int4", "bnb-nf4")
    for name in ("cuda", "rocm", "cpu"):
        assert quantizers.preference(name) == ("bnb-nf4", "quanto-int4"), name
    assert quantizers.preference("not-a-backend") == quantizers.FALLBACK

    class Int8FirstCpu(CpuBackend):
        preferred_quantizers = ("quanto-int8", "bnb-nf4")

    monkeypatch.setitem(backends._instances, "cpu", Int8FirstCpu())
    assert quantizers.preference("cpu") == ("quanto-int8", "bnb-nf4")
    assert quantizers.choose("cpu") == "quanto-int8"  # checked for being installed (the test extra installs it)


# ---- what a step can fill of a budget (the forecast's allocator allowance) ------------------------------------------


@pytest.mark.parametrize(
    "name, settings, env, expandable",
    [
        ("cuda", None, {}, False),
        ("cuda", None, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, True),
        ("cuda", None, {"PYTORCH_ALLOC_CONF": "max_split_size_mb:128, expandable_segments: true"}, True),
        ("cuda", "expandable_segments:True", {}, True),  # torch's own answer wins over the environment
        ("cuda", "", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, False),
        ("rocm", None, {"PYTORCH_HIP_ALLOC_CONF": "expandable_segments:True"}, True),
        ("cuda", None, {"PYTORCH_HIP_ALLOC_CONF": "expandable_segments:True"}, False),
    ],
)
def test_caching_allocator_leaves_part_of_a_cap_unfillable(monkeypatch, name, settings, env, expandable):
    for variable in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    if settings is None:
        monkeypatch.delattr(torch._C, "_accelerator_getAllocatorSettings", raising=False)
    else:
        monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: settings, raising=False)
    backend = backends.get(name)
    fraction, why = backend.allocatable_fraction(torch.device("cuda", 0))
    assert backend.expandable_segments() is expandable
    assert fraction == (0.96 if expandable else 0.90)
    assert ("expandable segments" in why) is expandable and "H100" in why


@pytest.mark.parametrize("name", ["cpu", "mps"])
def test_no_allowance_where_none_was_measured(name):
    fraction, why = backends.get(name).allocatable_fraction(torch.device(backends.get(name).device_type))
    assert fraction == 1.0 and why


def test_headroom_under_a_cap_is_what_the_cap_leaves(monkeypatch, host, cuda_caps):
    """memory_guard's cap comes before the device's free memory: prepare()'s pressure check and the forecast's
    default budget see what the process may still allocate, not what the device has free."""
    fake_cuda(monkeypatch, hip=None, integrated=False)
    uncapped = portable_kbit.snapshot("cuda")
    assert uncapped.headroom == CUDA_FREE + (CUDA_RESERVED - CUDA_ALLOCATED)
    with portable_kbit.memory_guard(cap_bytes=3 * GiB, device="cuda"):
        assert backends.get("cuda").allocator_cap(torch.device("cuda", 0)) == 3 * GiB
        assert portable_kbit.snapshot("cuda").headroom == 3 * GiB - CUDA_ALLOCATED
    with portable_kbit.memory_guard(cap_bytes=15 * GiB, device="cuda"):  # a cap above the free memory changes nothing
        assert portable_kbit.snapshot("cuda").headroom == uncapped.headroom
    assert backends.get("cuda").allocator_cap(torch.device("cuda", 0)) is None
    assert portable_kbit.snapshot("cuda").headroom == uncapped.headroom


def test_mps_cap_counts_only_below_its_largest_fraction(monkeypatch, mps_caps):
    backend = backends.get("mps")
    monkeypatch.setattr(backend, "fraction_basis", lambda device: 10 * GiB)
    device = torch.device("mps")
    backend.set_memory_fraction(device, 0.5)
    assert backend.allocator_cap(device) == 5 * GiB
    backend.set_memory_fraction(device, 0.0)  # MPS: no limit at all
    assert backend.allocator_cap(device) is None
    assert backends.get("cpu").allocator_cap(torch.device("cpu")) is None
