"""prepare() with its defaults, then FSDP1 and FSDP2 on two CPU processes (gloo): the model wraps and trains, and the
losses match the same model trained in one process.

FSDP1 flattens each unit into one tensor and refuses mixed dtypes (an fp32 norm in a bf16 decoder layer): with the
default frozen_norms="compute" no parameter changes dtype, so it wraps. FSDP2 with a bf16 MixedPrecisionPolicy would
cast an fp32 norm weight back to bf16 in forward without a word; computed in fp32 at call time, the norm keeps its
fp32 numerics. bitsandbytes 4-bit weights are packed into bf16 storage (bnb_4bit_quant_storage) to be sharded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from portable_kbit.tools import tiny

WORKER = Path(__file__).with_name("fsdp_worker.py")

# Seen on the H100 image (torch 2.11, CPU processes with gloo): with a bf16 param_dtype, FSDP2's all-gather changes
# bytes of the bf16-packed NF4 weights (bitsandbytes issue 1945: NaN bit patterns canonicalized), in every mode, ours
# or not, and the first loss moves by 3.6e-3. torch 2.13 keeps the bytes; so did torch 2.11 on an AMD EPYC (the CI
# kind): it depends on the machine too, so the mark is not strict. docs/multi-gpu.md says what to do.
BF16_POLICY_CORRUPTS_NF4 = pytest.mark.xfail(
    tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13),
    reason="torch < 2.13 on some machines: FSDP2's bf16 all-gather changes bf16-packed NF4 bytes (bitsandbytes 1945)",
    strict=False,
)


def policy_marks(wrap: str) -> list:
    return [BF16_POLICY_CORRUPTS_NF4] if wrap == "fsdp2-bf16" else []


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    out = tmp_path_factory.mktemp("fsdp") / "records.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(WORKER), tiny.checkpoint("llama"), str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), *sys.path]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def by_case(records: list[dict]) -> dict[tuple, dict]:
    return {(r["activations"], r["wrap"], r["modules_to_save"]): r for r in records}


def test_every_case_ran_and_prepare_changed_no_dtype(records):
    from fsdp_worker import CASES

    assert sorted(by_case(records)) == sorted(CASES)
    for record in records:
        assert record["dtypes_unchanged_by_prepare"], record
        assert all(torch.isfinite(torch.tensor(record["losses"]))), record
        assert record["losses"][-1] < record["losses"][0], record  # it learns


@pytest.mark.parametrize("activations", ["fp32", "layer", "native"])
@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(w, marks=policy_marks(w))
        for w in ("fsdp1-orig-params", "fsdp1-flat-params", "fsdp2", "fsdp2-bf16")
    ],
)
def test_sharded_losses_match_one_process(records, activations, wrap):
    cases = by_case(records)
    sharded, single = cases[(activations, wrap, False)], cases[(activations, "none", False)]
    for step, (a, b) in enumerate(zip(sharded["losses"], single["losses"], strict=True), start=1):
        assert abs(a - b) < 1e-3, f"{wrap} {activations} step {step}: {a:.6f} vs one process {b:.6f}"


@pytest.mark.parametrize("activations", ["fp32", "layer", "native"])
@pytest.mark.parametrize("wrap", [pytest.param(w, marks=policy_marks(w)) for w in ("fsdp2", "fsdp2-bf16")])
def test_fsdp2_computes_with_the_loaded_4bit_bytes(records, activations, wrap):
    """The packed 4-bit weights each layer computes with under FSDP2 are the bytes loaded: no NaN canonicalization of
    bf16-packed NF4 data in the all-gather (bitsandbytes issue 1945)."""
    assert by_case(records)[(activations, wrap, False)]["packed_weights_unchanged"] is True


def test_modules_to_save_trains_under_fsdp2(records):
    cases = by_case(records)
    sharded, single = cases[("fp32", "fsdp2", True)], cases[("fp32", "none", True)]
    for a, b in zip(sharded["losses"], single["losses"], strict=True):
        assert abs(a - b) < 1e-3, (sharded["losses"], single["losses"])


@pytest.mark.parametrize("activations, wrap", [("fp32", "fsdp2+offload"), ("native", "fsdp1-orig-params+offload")])
def test_offloaded_checkpoints_under_fsdp(records, activations, wrap):
    """prepare(offload_checkpoints=True) then FSDP (the CPU standing in for a device with memory of its own): the
    layer inputs went to the host, and the losses are those of one process without offload."""
    cases = by_case(records)
    sharded, single = cases[(activations, wrap, False)], cases[(activations, "none", False)]
    assert sharded["offloaded_tensors"] and single["offloaded_tensors"] is None, (sharded, single)
    for a, b in zip(sharded["losses"], single["losses"], strict=True):
        assert abs(a - b) < 1e-3, (sharded["losses"], single["losses"])
