"""benchmarks/loss_curves.py: gaps to peft, peft's own spread from a repeat in the same call, and the verdict that
sets a flow's gap against the bar or that spread, whichever is larger (what issue 23's default decision needs)."""

from __future__ import annotations

import benchmark_scripts


def _loss_curves():
    return benchmark_scripts.load("loss_curves")


def record(variant: str, seed: int, offset: float) -> dict:
    return {"variant": variant, "seed": seed, "losses": [10.0 + offset, 9.0 + offset, 8.0 + offset]}


def test_a_repeat_runs_the_variant_it_names(monkeypatch):
    curves = _loss_curves()
    from portable_kbit.tools import compare

    asked = []

    def fake_run(path, variant, *args, **kwargs):
        asked.append(variant)
        return [{"phase": "train", "losses": [1.0, 0.5]}]

    monkeypatch.setattr(compare, "run_in_subprocess", fake_run)
    out = curves.run("checkpoint", "peft#2", 1, 2, 16, "cpu", "one-sequence")
    assert asked == ["peft"] and out["variant"] == "peft#2" and out["losses"] == [1.0, 0.5]


def test_a_flow_is_judged_against_the_bar_or_peft_s_own_spread():
    curves = _loss_curves()
    records = [
        record("peft", 1, 0.0),
        record("peft", 2, 0.0),
        record("peft#2", 1, 0.04),  # peft moved by 0.04 against itself on seed 1, by nothing on seed 2
        record("peft#2", 2, 0.0),
        record("ours-mixed", 1, 0.03),  # beyond the bar, within peft's own spread
        record("ours-mixed", 2, 0.01),
        record("ours-native", 1, 0.05),
        record("ours-native", 2, 0.03),  # beyond the bar where peft did not move
    ]
    verdicts = curves.verdicts(records)
    assert set(verdicts) == {"ours-mixed", "ours-native"}  # peft's repeat is the yardstick, not a flow
    mixed = {v["seed"]: v for v in verdicts["ours-mixed"]}
    assert mixed[1]["within"] and abs(mixed[1]["allowed"] - 0.04) < 1e-9
    assert mixed[2]["within"] and mixed[2]["allowed"] == curves.BAR
    native = {v["seed"]: v["within"] for v in verdicts["ours-native"]}
    assert native == {1: False, 2: False}
    assert not any(
        v["within"] for v in curves.verdicts([record("peft", 1, 0.0), record("ours-fp32", 1, 0.021)])["ours-fp32"]
    )
