"""benchmarks/long_sequences.py: the fit search counts a length only when every shorter tested length fits, and
refines a coarse search in steps of 256 (simulated results; the script itself runs on a CPU with --preset tiny)."""

from __future__ import annotations

import sys

import benchmark_scripts
import pytest


@pytest.fixture(scope="module")
def bench():
    yield benchmark_scripts.load("long_sequences")
    del sys.modules["long_sequences"]


def simulate(search, fits_up_to: int, jobs: int = 1) -> list[int]:
    """Run the search as the parent does, `jobs` lengths at a time; a length fits when <= fits_up_to."""
    tested = []
    while True:
        batch = []
        for _ in range(jobs):
            length = search.next_length(set(batch))
            if length is None:
                break
            batch.append(length)
        if not batch:
            return tested
        for length in batch:
            if not search.cancelled(length):
                search.results[length] = {"fits": length <= fits_up_to}
                tested.append(length)


@pytest.mark.parametrize("jobs", [1, 4])
def test_fine_search_stops_at_the_first_failure(bench, jobs):
    search = bench.FitSearch("v", 1024, 4096, coarse=0)
    tested = simulate(search, fits_up_to=2304, jobs=jobs)
    assert search.longest() == 2304 and search.first_failure() == 2560
    assert max(tested) == 2560  # nothing longer than the first failure is counted


def test_coarse_then_fine(bench):
    search = bench.FitSearch("v", 1024, 8192, coarse=1024)
    tested = simulate(search, fits_up_to=5376)
    assert tested == [1024, 2048, 3072, 4096, 5120, 6144, 5376, 5632]
    assert search.longest() == 5376


def test_a_failure_below_a_fit_ends_the_count(bench):
    search = bench.FitSearch("v", 1024, 2048, coarse=0)
    search.results = {1024: {"fits": True}, 1280: {"fits": False}, 1536: {"fits": True}}
    assert search.longest() == 1024


def test_table_and_loss_gaps(bench):
    fits = {"peft": {"longest": 1792}, "native+blocks": {"longest": 7680}}
    times = [
        {"variant": "native", "seq_len": 4096, "step_seconds": 2.0, "losses": [10.0, 9.0]},
        {"variant": "native+blocks", "seq_len": 4096, "step_seconds": 2.2, "losses": [10.0, 9.0005]},
    ]
    text = bench.table(fits, times)
    assert "7680 (4.29x peft)" in text and "2.200 (1.10x)" in text
    assert bench.loss_gaps(times) == {"native+blocks@4096": pytest.approx(0.0005)}


def test_table_keeps_failures_without_a_length(bench):
    """A time run that failed before its first length, and a fit where no length fitted, still say so."""
    fits = {"native+blocks+offload": {"longest": None, "first_failure": 21848}}
    times = [{"variant": "mixed", "phase": "time", "error": "RuntimeError: no device"}]
    text = bench.table(fits, times)
    assert "| native+blocks+offload | < 21848 |" in text
    assert "| mixed |" in text and "RuntimeError: no device" in text


def _consumer_gpus():
    return benchmark_scripts.load("consumer_gpus")


def test_consumer_table_takes_a_remeasured_length_from_the_later_folder(tmp_path):
    """benchmarks/consumer_gpus.py: a length measured again in a later folder replaces the earlier verdict on it; the
    other lengths and configurations stay (run 10 measured shorter lengths under 8 GiB beside run 8's)."""
    import json

    consumer = _consumer_gpus()

    def folder(name: str, records: list[tuple[str, int, bool]]) -> str:
        path = tmp_path / name
        path.mkdir()
        lines = [
            {"phase": "fit-length", "variant": v, "seq_len": n, "fits": f, "cap_mib": 12288} for v, n, f in records
        ]
        (path / "long_fit.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
        return str(path)

    old = folder("old", [("native", 21848, False), ("fp32", 21848, True), ("fp32", 32768, False)])
    new = folder("new", [("native", 21848, True), ("fp32", 16384, True)])
    results = consumer.read([old, new])
    assert consumer.cell(results[12]["native"]) == ">= 21,848"
    assert consumer.cell(results[12]["fp32"]) == "21,848 (32,768 does not)"
    assert results[12]["fp32"]["fitted"] == [16384, 21848]
    assert consumer.cell(consumer.read([new, old])[12]["native"]) == "< 21,848"


def test_consumer_forecast_table_sets_each_prediction_beside_its_measurement(tmp_path):
    """benchmarks/consumer_gpus.py --forecasts: per measured length the predicted and measured peaks, their ratio,
    and a disagreement counted where the forecast's verdict and the measurement differ."""
    import json

    consumer = _consumer_gpus()
    mib = 1 << 20
    fits = [
        {
            "phase": "fit-length",
            "variant": "native",
            "seq_len": 1000,
            "fits": True,
            "cap_mib": 12288,
            "peak_allocated": 8000 * mib,
        },
        {"phase": "fit-length", "variant": "native", "seq_len": 2000, "fits": False, "cap_mib": 12288},
    ]
    (tmp_path / "long_fit.jsonl").write_text("\n".join(json.dumps(r) for r in fits) + "\n")
    forecast = {
        "kind": "forecast",
        "mode": "native",
        "budget_bytes": 12 << 30,
        "allocatable_bytes": 10000 * mib,
        "peak_bytes": {"1000": 8800 * mib, "2000": 9000 * mib},
        "longest_seq_len": 3000,
    }
    (tmp_path / "forecast.jsonl").write_text(json.dumps(forecast) + "\n")
    text = consumer.forecast_table(
        consumer.read([str(tmp_path)]), consumer.read_forecasts([str(tmp_path / "forecast.jsonl")])
    )
    assert "| 12 GiB | native | 3,000 | 1,000 | 8,800 MiB | 8,000 MiB | 1.100 | fits | trains |" in text
    assert "| 12 GiB | native | 3,000 | 2,000 | 9,000 MiB | - | - | fits | out of memory |" in text
    assert "1 lengths, worst 10.0% off" in text and "disagrees with the measurement at 1 length(s)" in text
