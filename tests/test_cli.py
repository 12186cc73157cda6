"""The console script: env, demo, compare and fit, through portable_kbit.tools.cli.main and once through the real entry
point."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from shared_runs import README_COMPARE, README_FIT, run_once

from portable_kbit import backends
from portable_kbit.tools import cli

README = Path(__file__).resolve().parents[1] / "README.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_env_json_lists_cpu_with_versions_and_working_quantizers(capsys):
    code, out, _ = run_main(capsys, "env", "--json")
    assert code == 0
    info = json.loads(out)
    by_name = {entry["name"]: entry for entry in info["backends"]}
    assert set(by_name) >= {"cuda", "rocm", "mps", "cpu"}
    cpu = by_name["cpu"]
    assert cpu["available"] and cpu["why_unavailable"] is None and cpu["unified"] is True
    assert cpu["memory"]["host_available"] > 0 and cpu["memory"]["process_rss"] > 0
    for entry in by_name.values():  # every unavailable backend says why
        assert entry["available"] or entry["why_unavailable"]
    for package in ("torch", "transformers", "peft", "bitsandbytes", "optimum-quanto"):
        assert package in info["versions"]
    assert info["versions"]["torch"] and info["versions"]["transformers"] and info["versions"]["peft"]
    cpu_probes = {p["quantizer"]: p for p in info["quantizers"] if p["backend"] == "cpu"}
    assert cpu_probes and all(p["works"] or p["why_not"] for p in cpu_probes.values())
    assert cpu_probes["bnb-nf4"]["works"] and cpu_probes["quanto-int4"]["works"]  # both in the test extra
    assert (
        info["default"]["backend"] == info["backends"][[e["available"] for e in info["backends"]].index(True)]["name"]
    )
    assert info["default"]["quantizer"] is not None


def test_env_human_output_says_why_a_backend_is_missing(capsys):
    code, out, _ = run_main(capsys, "env", "--no-probe")
    assert code == 0
    assert "cpu" in out and "available on cpu" in out
    assert "unavailable:" in out or "available on" in out.split("cpu")[0]  # a GPU box lists its accelerator
    assert "torch " in out and "transformers " in out


def test_demo_json_trains_with_finite_falling_losses(capsys):
    code, out, _ = run_main(capsys, "demo", "--steps", "2", "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert result["losses"][1] < result["losses"][0]
    assert result["quantizer"] in ("bnb-nf4", "quanto-int4")
    report = result["report"]
    assert report["policy"] == "adjacent" and report["skipped_quantized"] > 0 and report["upcast_norms"]
    assert report["gradient_checkpointing"] is True


def test_demo_human_output_prints_report_and_losses(capsys):
    code, out, _ = run_main(capsys, "demo", "--steps", "1", "--device", "cpu", "--activations", "native")
    assert code == 0
    assert "portable_kbit.prepare on cpu" in out and "activations=native" in out
    assert "LoRA training losses:" in out


def test_compare_tiny_writes_json_lines_table_and_png():
    # The README's own compare command (tests/test_readme.py runs it through the same cached run).
    assert "portable-kbit " + " ".join(README_COMPARE) in README.read_text()
    run = run_once(README_COMPARE)
    assert run.code == 0, run.err[-2000:]
    png, lines = run.workdir / "compare.png", run.workdir / "compare.jsonl"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    # --json-out writes the JSON lines; stdout has the table and says where they went, without a JSON line
    assert not [line for line in run.out.splitlines() if line.lstrip().startswith("{")], run.out
    assert "JSON lines: compare.jsonl" in run.out and "plot: compare.png" in run.out
    assert run.err.count("compare [") == 3  # a progress line per variant, on stderr
    assert not [r for r in records if "error" in r]
    phases = {(r["variant"], r["phase"]) for r in records}
    assert phases == {
        (v, p) for v in ("none", "peft", "ours-fp32") for p in ("start", "load", "prep", "lora", "train")
    }
    for record in records:
        assert record["seconds"] >= 0 and record["host_available"] > 0 and record["process_rss"] > 0
        assert "allocated" in record and "reserved" in record and "peak_allocated" in record
    trains = {r["variant"]: r for r in records if r["phase"] == "train"}
    for train in trains.values():
        assert len(train["losses"]) == 2 and all(math.isfinite(x) for x in train["losses"])
    preps = {r["variant"]: r for r in records if r["phase"] == "prep"}
    assert preps["ours-fp32"]["prep_report"]["upcast_norms"] > 0
    assert "| variant |" in run.out and "| ours-fp32 |" in run.out


def test_compare_run_variant_is_importable_and_records_errors(tmp_path):
    from portable_kbit.tools import compare, tiny

    records = compare.run_variant(
        tiny.checkpoint("llama"), "peft", "cpu", steps=1, seq_len=16, quantizer="quanto-int4"
    )
    # peft's own function cannot prepare an optimum-quanto model (notes/backend-facts.md): recorded, not raised
    assert [r["phase"] for r in records] == ["start", "load", "prep"]
    assert "cannot be changed" in records[-1]["error"]
    ours = compare.run_variant(
        tiny.checkpoint("llama"), "ours-native", "cpu", steps=1, seq_len=16, quantizer="quanto-int4"
    )
    assert [r["phase"] for r in ours] == list(compare.PHASES) and "error" not in ours[-1]


def test_the_progressions_task_learns_a_rule_and_scores_held_out_sequences():
    from portable_kbit.tools import compare, tiny

    rows = compare.progressions(4, 12, seed=1, device="cpu")
    strides = (rows[:, 1:] - rows[:, :-1]) % compare.PROGRESSION_TOKENS
    assert (strides == strides[:, :1]).all() and ((strides >= 1) & (strides <= 7)).all()  # one stride per row
    assert rows.min() >= 16 and rows.max() < 16 + compare.PROGRESSION_TOKENS
    assert not torch.equal(rows, compare.progressions(4, 12, seed=10_001, device="cpu"))  # held out: other rows
    records = compare.run_variant(
        tiny.checkpoint("llama"), "ours-fp32", "cpu", steps=3, seq_len=16, quantizer="bnb-nf4", task="progressions"
    )
    train = records[-1]
    assert train["phase"] == "train" and train["task"] == "progressions" and "error" not in train
    assert len(train["losses"]) == len(train["eval_losses"]) == 3
    assert train["losses"][-1] < train["losses"][0] and train["eval_losses"][-1] < train["eval_losses"][0]
    with pytest.raises(ValueError, match="unknown task"):
        compare.run_variant(tiny.checkpoint("llama"), "ours-fp32", "cpu", task="poetry")


def test_the_learning_rate_reaches_the_variant_process(capsys):
    """compare's internal one-variant run takes --lr (what loss_curves.py --lr passes): a larger rate moves the
    second step's loss further than the default 1e-4."""
    from portable_kbit.tools import tiny

    second = {}
    for lr in ("0.0001", "0.05"):
        argv = ["compare", tiny.checkpoint("llama"), "--variant", "ours-fp32", "--device", "cpu", "--steps", "2"]
        code, out, err = run_main(capsys, *argv, "--seq-len", "16", "--quantizer", "bnb-nf4", "--lr", lr)
        assert code == 0, err[-2000:]
        train = [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]
        second[lr] = train["losses"][0] - train["losses"][1]
    assert second["0.05"] > second["0.0001"] + 1e-3, second


AUTO_DEVICE = backends.resolve("auto").device.type


def test_fit_tiny_writes_a_table_per_mode_json_lines_and_png():
    from portable_kbit.pipeline.prepare import ACTIVATIONS

    # The README's own fit command (tests/test_readme.py runs it through the same cached run).
    assert "portable-kbit " + " ".join(README_FIT) in README.read_text()
    run = run_once(README_FIT)
    assert run.code == 0, run.err[-2000:]
    png, lines = run.workdir / "fit.png", run.workdir / "fit.jsonl"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    *records, recommendation = records
    assert [r["mode"] for r in records] == list(ACTIVATIONS) and {r["kind"] for r in records} == {"forecast"}
    # the longest length that fits, the fastest mode on a tie: every mode reaches the tiny model's 256 positions here
    assert recommendation["kind"] == "recommendation" and recommendation["configuration"] == "native", recommendation
    assert "recommendation: native, the configuration forecast to train the longest sequence" in run.out
    for record in records:
        assert record["quantizer"] == "bnb-nf4" and record["budget_bytes"] == 4 << 20
        assert record["method"] == "fake step + calibration" and record["lora_rank"] == 16
        assert sorted(int(k) for k in record["peak_bytes"]) == [64, 128, 256]
        peaks = [record["peak_bytes"][k] for k in ("64", "128", "256")]
        assert peaks == sorted(peaks) and all(p > 0 for p in peaks)
        assert record["longest_seq_len"] in (None, 256)  # the tiny config's maximum positions
        # the README's command names no device: "auto" (the GPU where there is one)
        assert f"activations={record['mode']}: fake step + calibration on {AUTO_DEVICE}" in run.out
    assert run.out.count("| seq_len | predicted peak (MiB) | fits |\n") == len(ACTIVATIONS)
    assert "measured" not in run.out  # no --verify: no measured columns
    rows = [line for line in run.out.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == len(ACTIVATIONS)
    for row, record in zip(rows, records, strict=True):  # MiB with one decimal, as the plot shows them
        assert row.split(" | ")[1] == f"{record['peak_bytes']['64'] / (1 << 20):.1f}", row


def test_fit_verify_runs_the_lengths_that_fit_in_fresh_processes(tmp_path, capsys):
    # 2 MiB: 64 tokens fit the tiny model, 256 do not: one fresh process verifies 64
    code, out, err = run_main(
        capsys,
        "fit",
        "tiny",
        "--activations",
        "native",
        "--budget",
        "2MiB",
        "--seq-lens",
        "64,256",
        "--device",
        "cpu",  # the byte counts above are the CPU's
        "--verify",
        "--json",
        "--lora-targets",
        "q_proj,v_proj,gate_proj,down_proj",
        "--cache-dir",
        str(tmp_path),
    )
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    forecast, *checks = records
    assert forecast["kind"] == "forecast" and forecast["longest_seq_len"] is None
    # the adapters where --lora-targets says, in this process and in the verifying one
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    assert forecast["lora_targets"] == targets and checks[0]["lora_targets"] == targets
    assert [(c["kind"], c["seq_len"], c["fits"], c["capped"]) for c in checks] == [("verify", 64, True, False)]
    assert abs(checks[0]["measured_bytes"] / forecast["peak_bytes"]["64"] - 1) <= 0.15


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--device", "nope"], "unknown device"),
        (["compare", "tiny", "--variants", "none,bogus"], "unknown variant"),
        (["compare", "/no/such/folder"], "neither a local checkpoint"),
        (["fit", "tiny", "--budget", "8XB"], "is not a size"),
        (["fit", "tiny", "--budget", "0"], "must be more than 0 bytes"),
        (["fit", "tiny", "--activations", "fp32,fp8"], "--activations 'fp32,fp8': use one or more of"),
        (["fit", "tiny", "--seq-lens", "512,-1"], "write positive ints"),
        (["fit", "tiny", "--batch-size", "0"], "--batch-size must be a positive int"),
        (["fit", "tiny", "--lora-targets", " ,"], "--lora-targets names no module"),
        (["fit", "/no/such/folder"], "neither a local checkpoint"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, argv, message):
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and message in err


def test_no_command_prints_help(capsys):
    code, out, _ = run_main(capsys)
    assert code == 2 and "env" in out and "demo" in out and "compare" in out and "fit" in out


def test_console_script_is_declared_and_runs():
    try:
        importlib.metadata.version("portable-kbit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("portable-kbit is not installed (run from a source tree on PYTHONPATH): no entry points to check")
    points = importlib.metadata.entry_points(group="console_scripts", name="portable-kbit")
    assert [p.value for p in points] == ["portable_kbit.tools.cli:main"]
    script = shutil.which("portable-kbit", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    command = [script] if script else [sys.executable, "-m", "portable_kbit"]
    done = subprocess.run([*command, "env", "--json", "--no-probe"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout)
    assert "cpu" in [e["name"] for e in info["backends"] if e["available"]]


def test_compare_plot_without_matplotlib_fails_before_measuring(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out, err = run_main(capsys, "compare", "tiny", "--plot", "never.png")
    assert code == 2 and "--plot needs matplotlib" in err and not out


def test_child_processes_import_this_portable_kbit():
    """compare and fit run variants in fresh processes: they must import this checkout, and only the package (its
    layer folders are not top-level modules)."""
    import subprocess
    import sys

    import portable_kbit
    from portable_kbit.tools.presets import child_env

    env = child_env()
    first = env["PYTHONPATH"].split(os.pathsep)[0]
    assert os.path.isfile(os.path.join(first, "portable_kbit", "__init__.py")), first
    code = "import portable_kbit, importlib.util; print(portable_kbit.__file__, importlib.util.find_spec('tools'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    location, tools = done.stdout.split()
    assert location == portable_kbit.__file__ and tools == "None"


# ---- quiet runs: only the project's own output, unless --verbose ---------------------------------------------------

#: what the libraries print on a first run that a user cannot act on (bitsandbytes' and torchao's import-time notices,
#: the kernels package's, torch's deprecation of torchao's enum registration, transformers' progress bars and notices,
#: library warnings)
NOISE = (
    "Failed to load",
    "kernels-community",
    "publisher trust",
    "register_constant",
    "_pytree.py",
    "Writing model shards",
    "Loading weights",
    "it/s]",
    "[transformers]",
    "FutureWarning",
    "DeprecationWarning",
    "UserWarning",
)


@functools.cache
@functools.cache
def fresh_run(*argv: str) -> subprocess.CompletedProcess:
    """`python -m portable_kbit ARGV` in a fresh process that imports this checkout (bitsandbytes and torchao are
    imported for the first time in it); presets cached in a folder of this test session's, built by the first run
    that needs one (so that building one is quiet too). Each command runs once per session: tests read its output."""
    from portable_kbit.tools.presets import child_env

    args = list(argv)
    if args[0] in ("compare", "fit"):
        args += ["--cache-dir", _session_cache_dir()]
    return subprocess.run(
        [sys.executable, "-m", "portable_kbit", *args], env=child_env(), capture_output=True, text=True, timeout=600
    )


@functools.cache
def _session_cache_dir() -> str:
    return tempfile.mkdtemp(prefix="portable_kbit_quiet_")


QUIET_RUNS = {
    "env": ("env",),
    "demo": ("demo", "--steps", "1", "--device", "cpu"),
    "compare": ("compare", "tiny", "--device", "cpu", "--variants", "ours-fp32", "--steps", "1", "--seq-len", "16"),
    "fit": (
        "fit",
        "tiny",
        "--device",
        "cpu",
        "--activations",
        "native",
        "--quantizer",
        "bnb-nf4",
        "--seq-lens",
        "64",
        "--budget",
        "2MiB",  # 64 tokens fit the tiny model, 256 do not: one fresh process verifies 64
        "--verify",
    ),
}


def noise_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(marker in line for marker in NOISE)]


@pytest.mark.parametrize("name", list(QUIET_RUNS))
def test_first_run_prints_only_the_projects_own_output(name):
    done = fresh_run(*QUIET_RUNS[name])
    assert done.returncode == 0, done.stderr[-2000:]
    assert noise_in(done.stdout) == [] and noise_in(done.stderr) == []
    assert done.stdout.strip()


def test_verbose_keeps_the_libraries_output():
    quiet = fresh_run(*QUIET_RUNS["demo"])
    loud = fresh_run(*QUIET_RUNS["demo"], "--verbose")
    assert quiet.returncode == loud.returncode == 0, loud.stderr[-2000:]
    assert noise_in(quiet.stderr) == []
    kept = noise_in(loud.stderr)
    assert kept, loud.stderr[-2000:]  # transformers' progress bars and notices at least
    assert any("Loading weights" in line or "[transformers]" in line for line in kept), kept


def test_compare_prints_a_table_and_no_json_by_default():
    done = fresh_run(*QUIET_RUNS["compare"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| variant |" in done.stdout and "| ours-fp32 |" in done.stdout
    assert not [line for line in done.stdout.splitlines() if line.lstrip().startswith("{")]
    assert "compare [1/1] ours-fp32: done" in done.stderr


def test_compare_json_prints_only_json_lines(capsys, tmp_path):
    argv = QUIET_RUNS["compare"][1:]
    code, out, err = run_main(capsys, "compare", *argv, "--json", "--cache-dir", str(tmp_path))
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in out.splitlines()]  # every line is one
    assert [r["phase"] for r in records] == ["start", "load", "prep", "lora", "train"]
    assert "| variant |" not in out and "compare [" not in err


def test_compare_plot_shows_each_phase_above_the_loaded_model(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from portable_kbit.tools import compare_view

    mib = 1 << 20
    records = []
    for variant, prep, peak in (("peft", 1200, 2200), ("ours-fp32", 2, 500)):
        for phase, allocated, peak_allocated in (
            ("start", 0, 0),
            ("load", 4000, 4300),
            ("prep", 4000 + prep, 4040 + prep),
            ("lora", 4060 + prep, 4060 + prep),
            ("train", 4080 + prep, 4000 + peak),
        ):
            records.append(
                {
                    "variant": variant,
                    "phase": phase,
                    "device": "cuda:0",
                    "checkpoint": "/x/mistral-7b",
                    "quantizer": "bnb-nf4",
                    "steps": 5,
                    "seq_len": 512,
                    "allocated": allocated * mib,
                    "reserved": (allocated + 100) * mib,
                    "peak_allocated": peak_allocated * mib,
                    "peak_reserved": (peak_allocated + 100) * mib,
                }
            )
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, path, **kwargs: saved.append(figure))
    compare_view.plot(records, str(tmp_path / "c.png"))
    (figure,) = saved
    allocated = figure.axes[0]
    assert [t.get_text() for t in allocated.get_xticklabels()] == ["prep", "lora", "train"]
    assert "above the loaded model" in allocated.get_ylabel() and allocated.get_xlabel().startswith("phase")
    heights = sorted(round(p.get_height()) for p in allocated.patches)  # ends and peaks, MiB above the load
    assert heights == sorted([1200, 1240, 1260, 1260, 1280, 2200, 2, 42, 62, 62, 82, 500])
    assert all(axis.get_legend() is None for axis in figure.axes) and len(figure.legends) == 1  # clear of bars
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "peft (loaded: 4,000.0 MiB allocated)" in labels
    assert figure.get_suptitle().startswith("mistral-7b on cuda:0 (bnb-nf4), 5 steps x 512 tokens")


def test_fit_verify_shows_measured_columns():
    done = fresh_run(*QUIET_RUNS["fit"])
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "| seq_len | predicted peak (MiB) | fits | measured peak (MiB) | measured / predicted |" in out
    row = next(line for line in out.splitlines() if line.startswith("| 64 |"))
    _, _, predicted, fits, measured, ratio, _ = (cell.strip() for cell in row.split("|"))
    assert re.fullmatch(r"\d+\.\d", predicted) and re.fullmatch(r"\d+\.\d", measured) and fits == "yes", row
    assert re.fullmatch(r"\d\.\d{3}", ratio), row


def test_fit_says_why_the_longest_length_is_capped(capsys, tmp_path):
    code, out, err = run_main(
        capsys, "fit", "tiny", "--device", "cpu", "--activations", "native", "--quantizer", "bnb-nf4",
        "--seq-lens", "64", "--budget", "64MiB", "--cache-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err[-2000:]
    # 64 MiB holds far more than 256 tokens of the tiny model: its config's 256 positions are the limit
    assert (
        "longest sequence that fits: 256 (capped by the model's maximum positions: 256 in its config; "
        "memory is not the limit)" in out
    )
    assert "measured" not in out  # no measured columns without --verify


def test_fit_table_says_capped_only_at_the_ceiling():
    from portable_kbit.tools import fit

    record = {
        "kind": "forecast",
        "mode": "fp32",
        "method": "fake step",
        "device": "cpu",
        "seconds": 1.0,
        "budget_bytes": 8 << 30,
        "budget_source": "argument",
        "peak_bytes": {"512": 3 << 30},
        "longest_seq_len": 4096,
        "max_seq_len": 4096,
        "max_positions": 4096,
        "notes": [],
    }
    assert fit.capped_by(record) == "capped by the model's maximum positions: 4096 in its config"
    assert "| 512 | 3072.0 | yes |" in fit.table([record]) and "measured" not in fit.table([record])
    assert "measured peak (MiB)" in fit.table([record], verify=True)
    assert fit.capped_by({**record, "max_positions": None}).startswith("capped by the search's ceiling, 4096")
    assert fit.capped_by({**record, "longest_seq_len": 3840}) is None  # memory decided: 4096 did not fit
    assert "longest sequence that fits: 3840\n" in fit.table([{**record, "longest_seq_len": 3840}]) + "\n"
    assert fit.capped_by({**record, "longest_seq_len": None}) is None


def test_quiet_drops_library_warnings_keeps_ours_and_puts_everything_back():
    import logging

    from transformers.utils import logging as hf_logging

    from portable_kbit import CannotCapWarning
    from portable_kbit.tools.quiet import LOGGERS, quiet

    before = (
        warnings.showwarning,
        list(warnings.filters),
        hf_logging.get_verbosity(),
        hf_logging.is_progress_bar_enabled(),
        [logging.getLogger(name).level for name in LOGGERS],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet():
            assert not hf_logging.is_progress_bar_enabled()
            assert all(logging.getLogger(name).level == logging.ERROR for name in LOGGERS)
            warnings.warn_explicit("a library's deprecation", FutureWarning, "/x/site-packages/transformers/a.py", 1)
            warnings.warn("the cpu backend cannot cap", CannotCapWarning, stacklevel=1)  # ours, by category
            warnings.warn("portable_kbit: a module computes in fp32", stacklevel=1)  # ours, by message
        with quiet(False):  # --verbose: the nested quiet() of the demo and the tiny models keeps everything
            with quiet():
                assert hf_logging.is_progress_bar_enabled() == before[3]
                warnings.warn_explicit("kept", FutureWarning, "/x/site-packages/peft/b.py", 2)
    assert [str(w.message) for w in caught] == [
        "the cpu backend cannot cap",
        "portable_kbit: a module computes in fp32",
        "kept",
    ]
    after = (
        warnings.showwarning,
        list(warnings.filters),
        hf_logging.get_verbosity(),
        hf_logging.is_progress_bar_enabled(),
        [logging.getLogger(name).level for name in LOGGERS],
    )
    assert after == before


def test_importing_the_package_and_its_tools_changes_no_logging_or_warnings():
    from portable_kbit.tools.presets import child_env

    code = (
        "import logging, warnings\n"
        "import torch, transformers.utils.logging\n"  # what they set up on import themselves
        "filters, show = list(warnings.filters), warnings.showwarning\n"
        "names = ('bitsandbytes', 'torchao', 'torch.utils._pytree', 'transformers')\n"
        "levels = [logging.getLogger(n).level for n in names]\n"
        "import portable_kbit, portable_kbit.tools.cli, portable_kbit.tools.tiny, portable_kbit.tools.demo\n"
        "from transformers.utils import logging as hf\n"
        "assert list(warnings.filters) == filters and warnings.showwarning is show\n"
        "assert [logging.getLogger(n).level for n in names] == levels\n"
        "assert hf.is_progress_bar_enabled()\n"
    )
    subprocess.run([sys.executable, "-c", code], env=child_env(), check=True, timeout=300)


# ---- help texts ----------------------------------------------------------------------------------------------------


def help_text(capsys, monkeypatch, command: str) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # no line breaks inside a hyphenated name
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "compare", "fit"])
def test_help_lists_the_choices(capsys, monkeypatch, command):
    from portable_kbit.pipeline.checks import ACTIVATIONS
    from portable_kbit.tools.compare import VARIANTS
    from portable_kbit.tools.quantizer_probe import PROBED
    from portable_kbit.tools.tiny import QUANTIZERS

    text = help_text(capsys, monkeypatch, command)
    assert set(PROBED) <= set(QUANTIZERS)
    assert all(quantizer in text for quantizer in QUANTIZERS), text
    assert "auto (default), cuda, cuda:N, rocm, mps or cpu" in text
    if command in ("demo", "fit"):
        assert f"one of {', '.join(ACTIVATIONS)}" in text or f"from: {', '.join(ACTIVATIONS)}" in text, text
    if command == "compare":
        assert f"from: {', '.join(VARIANTS)}" in text


def test_demo_takes_every_activations_mode_and_the_quantizers_are_checked():
    parser = cli.build_parser()
    assert parser.parse_args(["demo", "--activations", "layer"]).activations == "layer"
    for argv in (
        ["demo", "--quantizer", "bnb-nf5"],
        ["fit", "tiny", "--quantizer", "x"],
        ["compare", "t", "--quantizer", "x"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
