"""A failure anywhere after prepare()'s first change leaves the model exactly as it was, and says so.

Fault injection: the k-th cast chunk fails (for every k of a multi-chunk plan: before the chunk, in its middle, after
it), with an ordinary error, an out-of-memory error and a KeyboardInterrupt; then failures in the later steps
(dtype-flow hooks, the fp32 attention switch, token blocks, gradient checkpointing, input gradients, the report). Each
time the whole model state (tests/model_state.py: every parameter's dtype and bits, requires_grad, hooks, training and
checkpointing flags, config, attention implementations) is compared with a copy taken before the call, and the error
carries the "restored" note. MemoryPressureError comes before any change.
"""

from __future__ import annotations

import importlib
import math

import model_state
import pytest
import torch
from conftest import bitsandbytes_supports, planned_changes

import portable_kbit
from portable_kbit import backends
from portable_kbit.backends.cpu import CpuBackend
from portable_kbit.pipeline.cast import CastJournal
from portable_kbit.tools import tiny

prepare_module = importlib.import_module("portable_kbit.pipeline.prepare")  # the module, not the function
RESTORED = "the model was restored"

# (architecture, quantizer): a bitsandbytes model with RMSNorms, and an optimum-quanto one with LayerNorm biases.
MODELS = [("llama", "bnb-nf4"), ("gpt2", "quanto-int8")]
CHUNK_BYTES = 4096  # upcast="peft" on these models: embeddings and lm_head alone, norms a few to a chunk


class InjectedFault(RuntimeError):
    pass


def load(arch: str, quantizer: str, backend: str, device: str):
    if quantizer.startswith("bnb") and not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes does not run on {backend}")
    return tiny.load(tiny.checkpoint(arch), quantizer, device)


def restored_note(error: BaseException) -> str:
    notes = getattr(error, "__notes__", [])
    assert any(RESTORED in note for note in notes), f"no 'restored' note on {error!r}: {notes}"
    assert not any("also failed" in note for note in notes), notes
    return notes[-1]


def prepare_args(arch: str) -> dict:
    return dict(target_modules=tiny.LORA_TARGETS[arch], upcast="peft", chunk_bytes=CHUNK_BYTES)


def plan_chunks(model, arch: str) -> list[int]:
    """The number of casts in each chunk prepare() will make (the plan is built without changing anything)."""
    from portable_kbit.pipeline.cast import chunked

    changes = planned_changes(model, "peft", tiny.LORA_TARGETS[arch])
    return [len(chunk) for chunk in chunked(changes.casts, CHUNK_BYTES)]


def fail_on_chunk(monkeypatch, k: int, where: str, error: BaseException) -> dict:
    """Make CastJournal.apply raise `error` on its k-th call (0-based): before, in the middle of or after the chunk."""
    original = CastJournal.apply
    calls = {"n": 0, "casts_done_in_failing_chunk": 0}

    def apply(self, chunk, before_each=None):
        index = calls["n"]
        calls["n"] += 1
        if index != k:
            return original(self, chunk, before_each)
        if where == "before":
            raise error
        if where == "after":
            original(self, chunk, before_each)
            calls["casts_done_in_failing_chunk"] = len(chunk)
            raise error

        def middle(cast):  # let the first half of the chunk (at least one cast) through, then fail
            if calls["casts_done_in_failing_chunk"] >= max(1, len(chunk) // 2):
                raise error
            calls["casts_done_in_failing_chunk"] += 1

        original(self, chunk, middle)
        raise error  # a chunk of one cast: it went through, fail right after it

    monkeypatch.setattr(CastJournal, "apply", apply)
    return calls


def trains(model, arch: str) -> None:
    """After all the failures, prepare() still works on the restored model and LoRA trains."""
    portable_kbit.prepare(model, **prepare_args(arch))
    _, losses = tiny.train_lora(model, tiny.LORA_TARGETS[arch], steps=2)
    assert all(math.isfinite(loss) for loss in losses), losses


# ---- the k-th chunk fails ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,quantizer", MODELS, ids=[f"{a}-{q}" for a, q in MODELS])
@pytest.mark.parametrize("where", ["before", "middle", "after"])
def test_kth_chunk_failure_restores_everything(backend, device, arch, quantizer, where, monkeypatch):
    model = load(arch, quantizer, backend, device)
    sizes = plan_chunks(model, arch)
    assert len(sizes) >= 3, f"the plan should have several chunks, got {sizes}"
    before = model_state.take(model)
    for k in range(len(sizes)):
        with monkeypatch.context() as patch:
            calls = fail_on_chunk(patch, k, where, InjectedFault(f"injected failure in chunk {k}"))
            with pytest.raises(InjectedFault, match=f"injected failure in chunk {k}") as raised:
                portable_kbit.prepare(model, **prepare_args(arch))
        assert calls["n"] == k + 1, "prepare() went on after the failing chunk"
        if where == "after":
            assert calls["casts_done_in_failing_chunk"] == sizes[k]
        if where == "middle":
            assert calls["casts_done_in_failing_chunk"] >= 1  # a half-done chunk was undone too
        restored_note(raised.value)
        model_state.assert_unchanged(before, model, f"chunk {k}/{len(sizes)} failed {where} it")
        assert portable_kbit.report(model) is None
    trains(model, arch)


FAULTS = {  # what a chunk raises, where in the chunk, and the message the re-raised error must keep
    "out of memory": (
        lambda k: torch.OutOfMemoryError(f"CUDA out of memory (injected, chunk {k})"),
        "middle",
        "injected",
    ),
    "KeyboardInterrupt": (lambda k: KeyboardInterrupt(), "after", None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("arch,quantizer", MODELS, ids=[f"{a}-{q}" for a, q in MODELS])
def test_fault_in_a_chunk_restores_everything(backend, device, arch, quantizer, fault, monkeypatch):
    make_error, where, message = FAULTS[fault]
    model = load(arch, quantizer, backend, device)
    sizes = plan_chunks(model, arch)
    before = model_state.take(model)
    for k in range(len(sizes)):
        error = make_error(k)
        with monkeypatch.context() as patch:
            fail_on_chunk(patch, k, where, error)
            with pytest.raises(type(error), match=message) as raised:
                portable_kbit.prepare(model, **prepare_args(arch))
        restored_note(raised.value)
        model_state.assert_unchanged(before, model, f"{fault} {where} chunk {k}")
    trains(model, arch)


# ---- failures in the steps after the casts -------------------------------------------------------------------------


def _fail_after(function):
    """A stand-in that does the real work, then fails: the step's own changes must be undone too."""

    def wrapper(*args, **kwargs):
        function(*args, **kwargs)
        raise InjectedFault(f"injected failure after {function.__name__}")

    return wrapper


def _hooks_then_fail(original):
    def install(*args, **kwargs):
        for patch in original(*args, **kwargs):  # applied, never handed to the call's patch set
            patch.apply()
        raise InjectedFault("injected failure while installing hooks")

    return install


def _partial_hooks_then_fail(original):
    def install(*args, **kwargs):
        patches = original(*args, **kwargs)
        for patch in patches[: len(patches) // 2]:  # as if applying one raised midway
            patch.apply()
        raise InjectedFault("injected failure while installing hooks")

    return install


def _blocks_then_fail(model, blocks_plan, transaction):
    # the blocked head/loss and MLP forwards applied, never handed to the call's patch set
    from portable_kbit.patches.token_blocks import plan as blocks
    from portable_kbit.patches.token_blocks.counts import BlockedCalls

    for patch in blocks.patches(model, blocks_plan, BlockedCalls()):
        patch.apply()
    raise InjectedFault("injected failure while installing token blocks")


DTYPE_FLOW = importlib.import_module("portable_kbit.patches.dtype_flow")
STEPS = {
    "dtype flow (all applied, none recorded)": (DTYPE_FLOW, "install", _hooks_then_fail),
    "token blocks": (prepare_module, "add_token_blocks", _fail_after),
    "token blocks (patches not recorded)": (prepare_module, "add_token_blocks", lambda original: _blocks_then_fail),
    "dtype flow (half applied)": (DTYPE_FLOW, "install", _partial_hooks_then_fail),
    "fp32 attention": (prepare_module, "switch_attention", _fail_after),
    "gradient checkpointing": (prepare_module, "enable_gradient_checkpointing", _fail_after),
    "kernelization wrappers": (prepare_module, "keep_forwards_through_kernelization", _fail_after),
    "finish on devices": (prepare_module, "finish_on_devices", _fail_after),
    "report": (prepare_module, "build_report", _fail_after),
    "freeze": (prepare_module, "freeze_base_weights", _fail_after),
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("arch,quantizer", MODELS, ids=[f"{a}-{q}" for a, q in MODELS])
@pytest.mark.parametrize("upcast", ["adjacent", "peft"])
def test_failure_in_a_later_step_restores_everything(backend, device, arch, quantizer, upcast, step, monkeypatch):
    model = load(arch, quantizer, backend, device)
    before = model_state.take(model)
    module, name, make = STEPS[step]
    monkeypatch.setattr(module, name, make(getattr(module, name)))
    with pytest.raises(InjectedFault) as raised:
        portable_kbit.prepare(
            model,
            target_modules=tiny.LORA_TARGETS[arch],
            upcast=upcast,
            chunk_bytes=CHUNK_BYTES,
            token_blocks=64,  # the token blocks step installs something on every model here
        )
    restored_note(raised.value)
    model_state.assert_unchanged(before, model, f"failure in {step}")


@pytest.mark.parametrize("kwargs", [{}, {"use_reentrant": False}, {"use_reentrant": True}])
def test_failure_while_enabling_input_grads_restores_everything(backend, device, kwargs, monkeypatch):
    model = load("llama", "quanto-int4", backend, device)
    before = model_state.take(model)
    original = type(model).enable_input_require_grads

    calls = []

    def enable_then_fail(self):
        calls.append(self)
        original(self)
        raise InjectedFault("injected failure in enable_input_require_grads")

    # called by prepare() (reentrant checkpointing) or by transformers' own checkpointing enable (5.x: always)
    monkeypatch.setattr(type(model), "enable_input_require_grads", enable_then_fail)
    if kwargs.get("use_reentrant") is False:
        try:
            portable_kbit.prepare(model, gradient_checkpointing_kwargs=kwargs)
        except InjectedFault as error:  # transformers 5.x enables input grads itself
            restored_note(error)
            model_state.assert_unchanged(before, model, "failure in enable_input_require_grads")
        else:  # transformers 4.x: not needed without reentrant checkpointing, and not called
            assert not calls
        return
    with pytest.raises(InjectedFault) as raised:
        portable_kbit.prepare(model, gradient_checkpointing_kwargs=kwargs)
    restored_note(raised.value)
    model_state.assert_unchanged(before, model, "failure in enable_input_require_grads")


def test_failure_in_a_second_call_restores_the_first_calls_state(backend, device, monkeypatch):
    """A repeat that fails leaves the model as the first (successful) call left it: fp32 norms, hooks, checkpoints."""
    arch = "llama"
    model = load(arch, "quanto-int4", backend, device)
    portable_kbit.prepare(model, target_modules=tiny.LORA_TARGETS[arch])
    first_report = portable_kbit.report(model)
    hooks = model_state.hook_count(model)
    before = model_state.take(model)
    for step in ("dtype flow (all applied, none recorded)", "fp32 attention", "gradient checkpointing", "report"):
        module, name, make = STEPS[step]
        with monkeypatch.context() as patch:
            patch.setattr(module, name, make(getattr(module, name)))
            with pytest.raises(InjectedFault) as raised:
                # a different policy and checkpointing kwargs: the second call has casts and checkpointing to undo
                portable_kbit.prepare(
                    model,
                    target_modules=tiny.LORA_TARGETS[arch],
                    upcast="peft",
                    chunk_bytes=CHUNK_BYTES,
                    gradient_checkpointing_kwargs={"use_reentrant": False},
                )
        restored_note(raised.value)
        model_state.assert_unchanged(before, model, f"second call failed in {step}")
        assert portable_kbit.report(model) is first_report
        assert model_state.hook_count(model) == hooks
    # and the first call's hooks still work
    _, losses = tiny.train_lora(model, tiny.LORA_TARGETS[arch], steps=2)
    assert all(math.isfinite(loss) for loss in losses)


def test_failure_on_a_peft_model_restores_adapters_trainable(backend, device, monkeypatch):
    """On a PeftModel, the adapters stay trainable after a failed call (requires_grad restored, not just frozen)."""
    from peft import LoraConfig, get_peft_model

    arch = "llama"
    model = load(arch, "quanto-int4", backend, device)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=tiny.LORA_TARGETS[arch], modules_to_save=["lm_head"])
    )
    before = model_state.take(peft_model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    with monkeypatch.context() as patch:
        fail_on_chunk(patch, 0, "after", InjectedFault("injected failure in chunk 0"))
        with pytest.raises(InjectedFault) as raised:
            portable_kbit.prepare(peft_model, upcast="peft", chunk_bytes=CHUNK_BYTES)
    restored_note(raised.value)
    model_state.assert_unchanged(before, peft_model, "PeftModel, chunk 0 failed")
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable


def test_failed_undo_is_reported_in_the_note(backend, device, monkeypatch):
    """If restoring itself fails, the note says so instead of claiming the model was restored."""
    model = load("llama", "quanto-int4", backend, device)
    monkeypatch.setattr(CastJournal, "undo", lambda self: (_ for _ in ()).throw(RuntimeError("undo broke")))
    monkeypatch.setattr(prepare_module, "build_report", _fail_after(prepare_module.build_report))
    with pytest.raises(InjectedFault) as raised:
        portable_kbit.prepare(model, upcast="peft", chunk_bytes=CHUNK_BYTES)
    notes = raised.value.__notes__
    assert any("restoring the model also failed" in note and "undo broke" in note for note in notes), notes
    assert not any(RESTORED in note for note in notes), notes


# ---- memory pressure: refused before the first change ---------------------------------------------------------------


class LittleMemoryCpu(CpuBackend):
    """A stand-in CPU backend that reports a fixed, small headroom."""

    def __init__(self, headroom: int) -> None:
        self.fixed_headroom = headroom

    def headroom(self, device, stats, host_available):
        return self.fixed_headroom


def with_headroom(monkeypatch, headroom: int) -> None:
    monkeypatch.setitem(backends._instances, "cpu", LittleMemoryCpu(headroom))


def test_memory_pressure_error_before_any_change(monkeypatch):
    model = tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu")
    before = model_state.take(model)
    with_headroom(monkeypatch, 64 << 10)  # 64 KiB: the fp32 embeddings alone need 128 KiB
    applied = []
    monkeypatch.setattr(CastJournal, "apply", lambda self, chunk, before_each=None: applied.append(chunk))
    with pytest.raises(
        portable_kbit.MemoryPressureError, match=r"only 0\.1 MiB is available.*the model was not changed"
    ) as raised:
        portable_kbit.prepare(model, "cpu", upcast="peft")
    assert applied == [], "a cast was attempted"
    error = raised.value
    assert error.headroom == 64 << 10 and error.required > error.headroom and error.device == "cpu"
    assert not getattr(error, "__notes__", None)  # nothing to restore: nothing was changed
    model_state.assert_unchanged(before, model, "MemoryPressureError")
    assert portable_kbit.report(model) is None


def test_memory_pressure_shrinks_chunks_and_passes_when_it_fits(monkeypatch):
    model = tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu")
    with_headroom(monkeypatch, 8 << 20)  # 8 MiB: fits, but chunks shrink to the backend's minimum
    portable_kbit.prepare(model, "cpu", upcast="peft")
    report = portable_kbit.report(model)
    assert report.chunk_bytes_source == "shrunk by memory pressure"
    assert report.chunk_bytes == LittleMemoryCpu.min_chunk_bytes
    assert report.headroom_bytes == 8 << 20 and report.required_bytes <= report.headroom_bytes


def test_memory_pressure_with_nothing_to_cast_passes(monkeypatch):
    model = tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu")
    with_headroom(monkeypatch, 1024)
    portable_kbit.prepare(model, "cpu", upcast="none")
    assert portable_kbit.report(model).upcast == []


def test_memory_pressure_error_names_the_way_out(monkeypatch):
    model = tiny.load(tiny.checkpoint("llama"), "quanto-int4", "cpu")
    with_headroom(monkeypatch, 256)  # two fp32 norms of 128 need more
    with pytest.raises(portable_kbit.MemoryPressureError) as raised:
        portable_kbit.prepare(
            model, "cpu", upcast="adjacent", frozen_norms="upcast", target_modules=tiny.LORA_TARGETS["llama"]
        )
    message = str(raised.value)
    assert "frozen_norms='compute'" in message and "upcast='none'" in message and "chunk_bytes" in message
    assert isinstance(raised.value, RuntimeError)
