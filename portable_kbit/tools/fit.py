"""`portable-kbit fit`: will this model train at these lengths here? A forecast per configuration (an activations mode,
token blocks or not, offloaded checkpoints or not: tools/configurations.py), a table, a plot, a recommendation, and
(with --verify) real steps at the lengths the forecast says fit, each in a fresh process under a memory cap.

``forecast_mode()`` loads a checkpoint through its quantizer, prepares it with one configuration, attaches LoRA and
forecasts; ``verify_length()`` is the real step of one length (what each verifying subprocess runs);
``verify_in_subprocess()`` runs it in a fresh process; ``table()`` and ``plot()`` present the records.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from .. import backends
from ..constants import GiB, MiB
from ..memory.forecast import DEFAULT_SEQ_LENS, forecast, max_positions, measure_step, token_for
from ..memory.guard import memory_guard
from ..memory.longest import SEQ_LEN_STEP
from ..memory.snapshots import human_bytes
from . import configurations, presets, tiny
from . import quantizer_probe as quantizers

CHECKPOINTING = {"use_reentrant": False}
LORA_RANK = 16
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "t": 1000**4,
    "tb": 1000**4,
}


def parse_bytes(text: str) -> int:
    """'8GiB', '7.5G', '512MiB', '8000000000' -> bytes (GB/G are powers of 1000, GiB of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"budget {text!r} is not a size: write e.g. 8GiB, 7.5G, 512MiB or a number of bytes")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"budget {text!r} must be more than 0 bytes")
    return value


def parse_lengths(text: str) -> list[int]:
    """'512,1024' -> [512, 1024] (positive ints)."""
    try:
        lengths = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seq-lens {text!r}: write positive ints separated by commas, e.g. 512,1024,2048") from None
    if not lengths or any(length <= 0 for length in lengths):
        raise ValueError(f"--seq-lens {text!r}: write positive ints separated by commas, e.g. 512,1024,2048")
    return lengths


def activation_modes(text: str) -> list[str]:
    """'fp32,native+blocks' -> the configurations named: each an activations mode prepare() knows
    (portable_kbit.pipeline.checks.ACTIVATIONS), optionally with +blocks and/or +offload."""
    from ..pipeline.prepare import ACTIVATIONS

    modes = [mode.strip() for mode in str(text).split(",") if mode.strip()]
    try:
        for mode in modes:
            configurations.parse(mode)
    except ValueError:
        modes = []
    if not modes:
        raise ValueError(
            f"--activations {text!r}: use one or more of {', '.join(ACTIVATIONS)} (comma-separated), each optionally "
            "followed by +blocks and/or +offload"
        )
    return modes


def lora_targets(path: str, targets: Sequence[str] | None) -> list[str] | None:
    """The modules LoRA wraps: `targets`, or by default the checkpoint's attention projections (None: peft's
    defaults for its model type)."""
    return list(targets) if targets else presets.lora_targets(path)


def load_prepared(
    path: str, mode: str, device: str, quantizer: str, r: int = LORA_RANK, targets: Sequence[str] | None = None
) -> Any:
    """The model as it will be trained: loaded through `quantizer`, prepared as the configuration `mode` says
    ("native", "fp32+blocks+offload" ...), LoRA r on `targets` (default: the attention projections; lora_alpha 2r,
    no dropout), non-reentrant gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    from ..pipeline.prepare import prepare

    targets = lora_targets(path, targets)
    model = tiny.load(path, quantizer, device)
    options = configurations.parse(mode).prepare_options()
    model = prepare(model, device, target_modules=targets, gradient_checkpointing_kwargs=CHECKPOINTING, **options)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))


def _release(target: backends.Target) -> None:
    gc.collect()
    target.backend.synchronize(target.device)
    target.backend.release(target.device)


def forecast_mode(
    path: str,
    mode: str,
    device: str = "auto",
    quantizer: str | None = None,
    seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
    batch_size: int = 1,
    budget_bytes: int | None = None,
    r: int = LORA_RANK,
    targets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load, prepare with activations=`mode`, attach LoRA (r on `targets`: default the attention projections),
    forecast; the Forecast's record (plus what was loaded).
    The model is freed afterwards, so that the next mode starts from the same memory."""
    target = backends.resolve(device)
    quantizer = quantizer or quantizers.choose(target.backend.name)
    model = load_prepared(path, mode, str(target.device), quantizer, r, targets)
    try:
        positions = max_positions(model)
        result = forecast(model, seq_lens, batch_size, budget_bytes, device=str(target.device))
    finally:
        del model
        _release(target)
    return {
        "kind": "forecast",
        "mode": mode,
        "configuration": configurations.parse(mode).prepare_options(),
        "checkpoint": path,
        "quantizer": quantizer,
        "lora_rank": r,
        "lora_targets": lora_targets(path, targets),
        "max_positions": positions,
        **result.to_dict(),
    }


def verify_length(
    path: str,
    mode: str,
    seq_len: int,
    device: str = "auto",
    quantizer: str | None = None,
    batch_size: int = 1,
    cap_bytes: int | None = None,
    r: int = LORA_RANK,
    targets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One real training step at `seq_len` (after the optimizer state exists, as the forecast assumes), in this
    process, under a cap of `cap_bytes` where the backend can cap its allocator: the measured peak, or the error."""
    target = backends.resolve(device)
    quantizer = quantizer or quantizers.choose(target.backend.name)
    record: dict[str, Any] = {"kind": "verify", "mode": mode, "seq_len": seq_len, "cap_bytes": cap_bytes}
    record["lora_targets"] = lora_targets(path, targets)
    guard = None
    if cap_bytes is not None and target.backend.can_cap(target.device):
        guard = memory_guard(device=str(target.device), cap_bytes=cap_bytes)
    record["capped"] = guard is not None
    try:
        model = load_prepared(path, mode, str(target.device), quantizer, r, targets)
        measured = measure_step(model, target, seq_len, batch_size, token_for(model))
        record.update(measured_bytes=measured.peak_bytes, measured_by=measured.source)
        if cap_bytes is not None and guard is None:  # no cap here (CPU): the measurement decides
            record["fits"] = measured.peak_bytes <= cap_bytes
        else:
            record["fits"] = True
    except torch.OutOfMemoryError as error:
        record.update(fits=False, error=f"out of memory: {(str(error).splitlines() or [''])[0][:200]}")
    finally:
        if guard is not None:
            guard.restore()
    return record


def verify_in_subprocess(
    path: str,
    mode: str,
    seq_len: int,
    device: str,
    quantizer: str | None,
    batch_size: int,
    cap_bytes: int | None,
    r: int = LORA_RANK,
    targets: Sequence[str] | None = None,
    timeout: float | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """verify_length() in a fresh Python process (nothing cached from this one); its record, or one that says how
    the process ended. With `verbose` the child keeps the libraries' output (--verbose), copied to this stderr."""
    command = [sys.executable, "-m", "portable_kbit", "fit", path, "--verify-one", str(seq_len), "--activations"]
    command += [mode, "--device", device, "--batch-size", str(batch_size), "--lora-rank", str(r)]
    if targets:
        command += ["--lora-targets", ",".join(targets)]
    if quantizer:
        command += ["--quantizer", quantizer]
    if cap_bytes is not None:
        command += ["--budget", str(cap_bytes)]
    if verbose:
        command.append("--verbose")
    with tempfile.TemporaryFile(mode="w+") as errors:
        done = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=errors, text=True, env=presets.child_env(), timeout=timeout
        )
        if verbose:
            errors.seek(0)
            sys.stderr.write(errors.read())
            sys.stderr.flush()
        for line in reversed(done.stdout.splitlines()):
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("kind") == "verify":
                    return record
        errors.seek(0)
        tail = errors.read()[-2000:].strip().splitlines()
    killed = "killed (out of memory?)" if done.returncode in (-9, 137) else f"exit status {done.returncode}"
    return {
        "kind": "verify",
        "mode": mode,
        "seq_len": seq_len,
        "cap_bytes": cap_bytes,
        "fits": False,
        "error": f"{killed}: {tail[-1] if tail else 'no output'}",
    }


def allocatable(record: dict[str, Any]) -> int:
    """The bytes of a forecast record's budget that a step's peak can fill (records written before the allocator's
    share was modelled: the whole budget)."""
    return int(record.get("allocatable_bytes", record["budget_bytes"]))


def verify_lengths(record: dict[str, Any]) -> list[int]:
    """The lengths a forecast says fit (the requested ones that fit, and the longest), to verify."""
    lengths = {int(k) for k, v in record["peak_bytes"].items() if v <= allocatable(record)}
    if record.get("longest_seq_len"):
        lengths.add(int(record["longest_seq_len"]))
    return sorted(lengths)


# ---- presentation ---------------------------------------------------------------------------------------------------


def capped_by(record: dict[str, Any]) -> str | None:
    """Why a forecast's longest length is not longer when memory is not the limit: it is the last multiple of
    SEQ_LEN_STEP the search may try (max_seq_len, the model's maximum positions); None when the budget decides."""
    longest, ceiling = record.get("longest_seq_len"), record.get("max_seq_len")
    if not longest or not ceiling or longest + SEQ_LEN_STEP <= ceiling:
        return None
    if record.get("max_positions") == ceiling:
        return f"capped by the model's maximum positions: {ceiling} in its config"
    if "max_positions" in record and record["max_positions"] is None:
        return f"capped by the search's ceiling, {ceiling} tokens: the config names no maximum positions"
    return f"capped by max_seq_len, {ceiling}"


def _mib(value: float) -> str:
    return f"{value / MiB:.1f}"


def table(records: Sequence[dict[str, Any]], verify: bool | None = None) -> str:
    """A table per mode: predicted peak per length (MiB, one decimal), fits or not, and the measured peak where
    verified. `verify`: show the measured columns (None: where there are verify records)."""
    blocks = []
    if verify is None:
        verify = any(r.get("kind") == "verify" for r in records)
    for forecast_record in (r for r in records if r.get("kind") == "forecast"):
        mode = forecast_record["mode"]
        budget = forecast_record["budget_bytes"]
        fillable = allocatable(forecast_record)
        verified = {r["seq_len"]: r for r in records if r.get("kind") == "verify" and r.get("mode") == mode}
        head = ["seq_len", "predicted peak (MiB)", "fits"]
        if verify:
            head += ["measured peak (MiB)", "measured / predicted"]
        lines = [
            f"activations={mode}: {forecast_record['method']} on {forecast_record['device']} in "
            f"{forecast_record['seconds']:.1f} s; budget {human_bytes(budget)} ({forecast_record['budget_source']}), "
            f"of which a step can fill {human_bytes(fillable)} ({forecast_record.get('allocator', 'as counted')})",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        predictions = {int(k): v for k, v in forecast_record["peak_bytes"].items()}
        longest = forecast_record.get("longest_seq_len")
        if longest and longest not in predictions and longest in verified:
            predictions[longest] = None
        for seq_len in sorted(set(predictions) | set(verified)):
            predicted = predictions.get(seq_len)
            fits = "" if predicted is None else ("yes" if predicted <= fillable else "no")
            row = [f"{seq_len} (longest)" if seq_len == longest else str(seq_len)]
            row += ["" if predicted is None else _mib(predicted), fits]
            if verify:
                check = verified.get(seq_len)
                measured, ratio = "", ""
                if check is not None and check.get("measured_bytes") is not None:
                    measured = _mib(check["measured_bytes"])
                    if predicted:
                        ratio = f"{check['measured_bytes'] / predicted:.3f}"
                elif check is not None:
                    measured = check.get("error", "failed")
                row += [measured, ratio]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        cap = capped_by(forecast_record)
        shown = f"{longest}" if longest else f"none (not even {SEQ_LEN_STEP} tokens)"
        lines.append(f"longest sequence that fits: {shown}" + (f" ({cap}; memory is not the limit)" if cap else ""))
        lines += [f"note: {note}" for note in forecast_record.get("notes", [])]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def shown_up_to(forecast_record: dict[str, Any], records: Sequence[dict[str, Any]]) -> float:
    """The longest length a plot shows of a forecast's predictions: a quarter past the longest of the requested,
    the longest that fits and the verified lengths (the search also predicts the model's maximum, 32k say, which
    would flatten everything that matters)."""
    mode = forecast_record.get("mode")
    lengths = [int(k) for k in forecast_record["peak_bytes"]]
    lengths += [r["seq_len"] for r in records if r.get("kind") == "verify" and r.get("mode") == mode]
    lengths.append(forecast_record.get("longest_seq_len") or 0)
    return 1.25 * max(lengths)


def plot(records: Sequence[dict[str, Any]], path: str, title: str | None = None) -> str:
    """Predicted peak against sequence length per mode, the budget as a line, measured points where verified, the
    longest length that fits as a vertical line per distinct value (modes that share one share its line and label),
    and the lengths past the model's maximum positions shaded; saved as a PNG at `path`. Needs matplotlib (the
    "plot" extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'portable-kbit[plot]'") from error

    figure = Figure(figsize=(9, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    budgets = set()
    forecasts = [r for r in records if r.get("kind") == "forecast"]
    largest = max([r["budget_bytes"] for r in forecasts] + [1], default=1)
    scale, unit = (GiB, "GiB") if largest >= GiB else (MiB, "MiB")
    right = max([shown_up_to(r, records) for r in forecasts], default=1.0)
    markers = ("o", "s", "^", "D", "v")
    longest_modes: dict[int, list[int]] = {}  # longest length -> indexes of the modes it belongs to
    for index, record in enumerate(forecasts):
        color = f"C{index}"
        points = {int(k): v for k, v in (record.get("predictions") or record["peak_bytes"]).items()}
        xs = [x for x in sorted(points) if x <= right]
        axis.plot(
            xs,
            [points[x] / scale for x in xs],
            marker=markers[index % len(markers)],
            markersize=5,
            color=color,
            label=f"{record['mode']}: predicted",
        )
        if record.get("longest_seq_len"):
            longest_modes.setdefault(int(record["longest_seq_len"]), []).append(index)
        checks = [r for r in records if r.get("kind") == "verify" and r.get("mode") == record["mode"]]
        measured = [(r["seq_len"], r["measured_bytes"] / scale) for r in checks if r.get("measured_bytes") is not None]
        if measured:
            xs_measured, ys_measured = zip(*measured, strict=True)
            axis.scatter(xs_measured, ys_measured, marker="x", s=60, color=color, label=f"{record['mode']}: measured")
        for seq_len in [r["seq_len"] for r in checks if r.get("measured_bytes") is None]:
            axis.annotate("failed", (seq_len, record["budget_bytes"] / scale), color=color, fontsize=8)
        budgets.add((record["budget_bytes"], allocatable(record)))
    styles = (":", "--", "-.", (0, (5, 2, 1, 2, 1, 2)))
    for number, (longest, indexes) in enumerate(sorted(longest_modes.items())):
        color = f"C{indexes[0]}" if len(indexes) == 1 else "0.3"
        modes = ", ".join(forecasts[i]["mode"] for i in indexes)
        axis.axvline(
            longest,
            color=color,
            linestyle=styles[number % len(styles)],
            linewidth=1.5,
            label=f"longest that fits ({modes}): {longest}",
        )
        axis.annotate(
            f"{longest} ({modes})",
            (longest, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(-3, 0),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="bottom",
            fontsize=7,
            color=color,
        )
    ceilings = {r["max_seq_len"] for r in forecasts if capped_by(r) and r.get("max_seq_len", right) < right}
    for ceiling in sorted(ceilings)[:1]:
        axis.axvspan(ceiling, right, color="0.9", zorder=0, label=f"past the model's maximum positions ({ceiling})")
    for budget, fillable in sorted(budgets):
        axis.axhline(budget / scale, color="black", linestyle="--", linewidth=1, label=f"budget {human_bytes(budget)}")
        if fillable < budget:
            label = f"a step can fill {human_bytes(fillable)}"
            axis.axhline(fillable / scale, color="gray", linestyle="-.", linewidth=1, label=label)
    axis.set_xlim(0, right)
    axis.set_xlabel("sequence length (tokens)")
    axis.set_ylabel(f"training-step peak ({unit})")
    axis.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize=8)
    if title is None and forecasts:
        first = forecasts[0]
        name = str(first["checkpoint"]).rstrip("/").split("/")[-1]
        title = f"{name} ({first['quantizer']}, LoRA r{first['lora_rank']}) on {first['device']}, "
        title += f"batch {first['batch_size']}"
    if title:  # over the whole figure: an axes title runs under the legend beside the axes
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=110)
    return path


__all__ = [
    "activation_modes",
    "capped_by",
    "forecast_mode",
    "load_prepared",
    "parse_bytes",
    "parse_lengths",
    "plot",
    "table",
    "verify_in_subprocess",
    "verify_length",
    "verify_lengths",
]
