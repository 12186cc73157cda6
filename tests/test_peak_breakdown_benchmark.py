"""benchmarks/peak_breakdown.py on the tiny preset: the fake step's peak, and the tensors live at it with the op and
the model code that made them."""

from __future__ import annotations

import benchmark_scripts

from portable_kbit.backends.cpu import CpuBackend


def test_the_breakdown_names_what_the_peak_holds():
    script = benchmark_scripts.load("peak_breakdown")
    model = script.build(2, "native", preset="tiny")
    assert CpuBackend().why_no_offload(None) is not None  # the stand-in lasted only for prepare()
    record = script.breakdown(model, 512)
    assert record["peak_mib"] > record["static_mib"] > 0
    # what the step made and keeps at the snapshot is part of the peak, and the snapshot is within a step of it
    assert 0 < record["made_in_step_mib"] <= record["snapshot_mib"] <= record["peak_mib"]
    assert record["peak_mib"] - record["snapshot_mib"] <= script.SNAPSHOT_STEP / script.MiB
    assert sum(record["by_op_mib"].values()) > 0 and record["largest"][0]["mib"] > 0
    assert record["snapshot_phase"] in ("forward", "backward", "optimizer")
