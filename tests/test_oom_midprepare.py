"""An out-of-memory in the middle of prepare()'s cast chunks (benchmarks/oom_midprepare.py; on the CPU an injected
torch.OutOfMemoryError stands in for the allocator's): the model comes back bit for bit, the error says which chunk
and what to do, and a second prepare() succeeds. The undo itself needs no memory: where a downcast finds none, it is
written into the fp32 tensor's own storage."""

from __future__ import annotations

import benchmark_scripts
import pytest
import torch
from torch import nn

from portable_kbit.pipeline import cast as cast_module
from portable_kbit.pipeline.cast import CastJournal, downcast_in_place
from portable_kbit.pipeline.plan import ParamCast

oom_midprepare = benchmark_scripts.load("oom_midprepare")


def test_out_of_memory_mid_prepare_restores_the_model_and_a_second_prepare_succeeds(tmp_path):
    record = oom_midprepare.run("tiny", "cpu", str(tmp_path), 32 << 10)
    first = record["first_prepare"]
    assert len(record["chunks"]) >= 3 and 0 < record["failing_chunk"] < len(record["chunks"])
    assert first["chunks_done_before_the_failure"] == record["failing_chunk"]  # earlier chunks were cast, then undone
    assert first["casts_done_before_the_failure"] >= 2
    assert first["raised"] == "OutOfMemoryError"
    notes = "\n".join(first["notes"])
    assert f"chunk {record['failing_chunk'] + 1} of {len(record['chunks'])}" in notes
    assert "ran out of memory" in notes and "the model was restored" in notes
    assert record["restored_bit_for_bit"], record["differences"]
    assert not record["report_after_failure"]
    assert record["second_prepare"]["ok"], record["second_prepare"]
    assert record["ok"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_downcast_in_place_gives_the_original_bits_in_the_same_storage(dtype):
    original = torch.randn(3, 1000, dtype=torch.float32).to(dtype)
    upcast = original.float()
    address = upcast.untyped_storage().data_ptr()
    back = downcast_in_place(upcast, dtype, block=64)  # many blocks: the overlap rule is exercised
    assert back.dtype == dtype and back.shape == original.shape
    assert torch.equal(back.view(torch.int16), original.view(torch.int16))
    assert back.untyped_storage().data_ptr() == address


def test_undo_without_memory_for_the_downcast_still_restores(monkeypatch):
    layer = nn.Linear(64, 64).to(torch.bfloat16)
    bits = layer.weight.detach().clone()
    journal = CastJournal()
    journal.apply([ParamCast("weight", layer, "weight", torch.bfloat16, torch.float32, 64 * 64, bits.device)])
    assert layer.weight.dtype == torch.float32

    def no_memory(tensor, dtype):
        raise torch.OutOfMemoryError("no room (injected)")

    monkeypatch.setattr(cast_module, "downcast", no_memory)
    journal.undo()
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight.detach().view(torch.int16), bits.view(torch.int16))
    # once the undo is over, the values move to a storage of their own size (the clone found room here)
    assert layer.weight.untyped_storage().nbytes() == 64 * 64 * 2
