"""`portable-kbit fit` over configurations (tools/configurations.py): names, which are tried where, the summary and
the recommendation."""

from __future__ import annotations

import json

import pytest

from portable_kbit.tools import configurations as c
from portable_kbit.tools.cli import main

NO_OFFLOAD = "cpu: the device's memory is the host's, so moving tensors to the host frees nothing"


def test_names_round_trip_and_bad_names_say_what_is_known():
    for name in ("fp32", "native+blocks", "mixed+offload", "layer+blocks+offload"):
        assert c.parse(name).name == name
    assert c.parse("native+blocks+offload").prepare_options() == {
        "activations": "native",
        "token_blocks": "auto",
        "offload_checkpoints": True,
    }
    for bad in ("fp16", "native+fast", "native+blocks+blocks"):
        with pytest.raises(ValueError, match="optionally followed by \\+blocks and/or \\+offload"):
            c.parse(bad)


def test_expand_tries_offload_only_where_it_can_help():
    chosen, notes = c.expand(["native", "fp32"], "both", "auto", NO_OFFLOAD)
    assert [x.name for x in chosen] == ["native", "native+blocks", "fp32", "fp32+blocks"]
    assert notes == [f"offloaded checkpoints not tried: {NO_OFFLOAD}"]
    chosen, notes = c.expand(["native"], "off", "auto", None)  # a GPU with memory of its own
    assert [x.name for x in chosen] == ["native", "native+offload"] and notes == []
    with pytest.raises(ValueError, match="--offload on: cpu"):
        c.expand(["native"], "off", "on", NO_OFFLOAD)
    with pytest.raises(ValueError, match="'native\\+offload': cpu"):
        c.expand(["native+offload"], "off", "off", NO_OFFLOAD)
    # a configuration named in full is taken as named, once
    chosen, _ = c.expand(["native+blocks", "native"], "on", "off", None)
    assert [x.name for x in chosen] == ["native+blocks"]


def forecast(name: str, longest: int | None) -> dict:
    return {"kind": "forecast", "mode": name, "longest_seq_len": longest, "peak_bytes": {"512": 1 << 20}}


def test_recommend_the_longest_or_the_fastest_that_reaches_the_length():
    records = [forecast("fp32", 4096), forecast("fp32+blocks+offload", 16384), forecast("native+blocks", 16384)]
    best = c.recommend(records)
    # the longest; on a tie the faster: native before fp32, whatever the extras
    assert best["configuration"] == "native+blocks" and best["longest_seq_len"] == 16384
    # the fastest that reaches the length: native's step, with blocks, is faster than fp32's without
    assert c.recommend(records, seq_len=4096)["configuration"] == "native+blocks"
    fp32_only = [forecast("fp32", 4096), forecast("fp32+blocks", 8192), forecast("fp32+blocks+offload", 16384)]
    assert c.recommend(fp32_only, seq_len=4096)["configuration"] == "fp32"  # without extras first
    assert c.recommend(fp32_only, seq_len=8192)["configuration"] == "fp32+blocks"  # then without offload
    assert c.recommend(records, seq_len=32768) is None
    assert "none of the configurations is forecast to fit 32768 tokens" in c.line(None, 32768)
    assert "prepare(model, activations='native', token_blocks='auto', offload_checkpoints=False)" in c.line(best)
    table = c.summary(records)
    assert table.splitlines()[0] == "| configuration | peak at 512 (MiB) | longest that fits |"
    assert "| fp32+blocks+offload | 1.0 | 16384 |" in table


def test_fit_over_configurations_on_the_cpu(capsys, tmp_path):
    argv = ["fit", "tiny", "--device", "cpu", "--activations", "native", "--token-blocks", "both"]
    argv += ["--offload", "auto", "--seq-lens", "64,128", "--budget", "64MiB", "--json", "--cache-dir", str(tmp_path)]
    argv += ["--seq-len", "128"]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in records if r["kind"] == "forecast"] == ["native", "native+blocks"]
    assert [r["configuration"] for r in records if r["kind"] == "forecast"] == [
        {"activations": "native", "token_blocks": None, "offload_checkpoints": False},
        {"activations": "native", "token_blocks": "auto", "offload_checkpoints": False},
    ]
    (recommendation,) = [r for r in records if r["kind"] == "recommendation"]
    assert recommendation["configuration"] == "native" and recommendation["seq_len"] == 128
