"""How a comparison's records are shown: a markdown table, and a plot of memory per phase for each variant."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from ..constants import MiB
from .compare import PHASES


class Progress:
    """One line on stderr as each variant's process ends (a comparison takes minutes on a big model)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.started = time.perf_counter()

    def seen(self, record: dict) -> None:
        """Called with every record as it comes; prints when a variant is done (its train phase) or failed."""
        if record.get("phase") != "train" and "error" not in record:
            return
        self.done += 1
        now = time.perf_counter()
        verdict = "done" if "error" not in record else f"failed in {record['phase']}: {record['error']}"
        print(
            f"compare [{self.done}/{self.total}] {record.get('variant')}: {verdict} ({now - self.started:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        self.started = now


def _by_variant(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for record in records:
        out.setdefault(record["variant"], {})[record["phase"]] = record
    return out


def _metrics(records: Sequence[dict]) -> list[tuple[str, str, str]]:
    """(value field, peak field, label) to show: the allocator's numbers where there are any, else process RSS."""
    if any(r.get("allocated") is not None for r in records):
        return [("allocated", "peak_allocated", "allocated"), ("reserved", "peak_reserved", "reserved")]
    return [("process_rss", "peak_process_rss", "process RSS")]


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / MiB:.0f}"


def _signed_mib(value: float | None) -> str:
    return "" if value is None else f"{value / MiB:+.0f}"


def table(records: Sequence[dict]) -> str:
    """A markdown table: per variant, memory after loading, what the preparation added, the training peak, losses."""
    metrics = _metrics(records)
    head = ["variant"]
    for _, _, label in metrics:
        head += [f"load: {label}", f"prep: {label}", f"prep: peak {label}"]
    head += ["prep s"] + [f"train: peak {label}" for _, _, label in metrics] + ["losses", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, phases in _by_variant(records).items():
        load, prep, train = phases.get("load", {}), phases.get("prep", {}), phases.get("train", {})
        row = [variant]
        for field, peak_field, _ in metrics:
            base = load.get(field)
            row += [
                _mib(base),
                _signed_mib(None if prep.get(field) is None or base is None else prep[field] - base),
                _signed_mib(None if prep.get(peak_field) is None or base is None else prep[peak_field] - base),
            ]
        row.append("" if "seconds" not in prep else f"{prep['seconds']:.3f}")
        row += [_mib(train.get(peak_field)) for _, peak_field, _ in metrics]
        row.append(" ".join(f"{loss:.4f}" for loss in train.get("losses", [])))
        row.append(next((f"{r['phase']}: {r['error']}" for r in phases.values() if "error" in r), ""))
        lines.append("| " + " | ".join(row) + " |")
    unit = "MiB; prep columns relative to after loading"
    if metrics[0][0] == "process_rss":
        unit += "; no allocator on this device, so process RSS (peaks polled once per step)"
    return "\n".join(lines) + f"\n({unit})"


def plot(records: Sequence[dict], path: str, title: str | None = None) -> str:
    """Draw allocated and reserved (process RSS where the device has no allocator) at the end of each phase for
    each variant, with the phase's peak as a tick; save a PNG to `path`. Needs matplotlib (the "plot" extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'portable-kbit[plot]'") from error

    by_variant = _by_variant(records)
    metrics = _metrics(records)
    phases = [p for p in PHASES if any(p in v for v in by_variant.values())]
    figure = Figure(figsize=(6.5 * len(metrics), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    width = 0.8 / max(1, len(by_variant))
    for axis, (field, peak_field, label) in zip(axes, metrics, strict=True):
        for index, (variant, recorded) in enumerate(by_variant.items()):
            xs, values, peaks = [], [], []
            for position, phase in enumerate(phases):
                record = recorded.get(phase)
                if record is None or record.get(field) is None:
                    continue
                xs.append(position - 0.4 + width * (index + 0.5))
                values.append(record[field] / MiB)
                peaks.append((record.get(peak_field) or record[field]) / MiB)
            failed = next((r for r in recorded.values() if "error" in r), None)
            name = variant if failed is None else f"{variant} (failed in {failed['phase']})"
            bars = axis.bar(xs, values, width=width * 0.92, label=name)
            axis.scatter(
                xs,
                peaks,
                marker="_",
                s=220,
                color=bars.patches[0].get_facecolor() if bars.patches else None,
                linewidths=2,
                zorder=3,
            )
        axis.set_xticks(range(len(phases)), phases)
        axis.set_ylabel(f"{label} (MiB)")
        axis.set_title(f"{label} at the end of each phase (tick: the phase's peak)", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title is None and records:
        first = records[0]
        title = (
            f"{os.path.basename(str(first.get('checkpoint', '')).rstrip(os.sep))} on {first.get('device')} "
            f"({first.get('quantizer')}), {first.get('steps')} steps x {first.get('seq_len')} tokens"
        )
    if title:
        figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=110)
    return path
