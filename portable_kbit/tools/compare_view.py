"""How a comparison's records are shown: a progress line per variant, a markdown table, and a plot of what each phase
adds to the loaded model for each variant."""

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


#: the phases a plot shows, each relative to the variant's own memory after loading (its baseline)
PLOTTED_PHASES = tuple(phase for phase in PHASES if phase not in ("start", "load"))


def _above_load(recorded: dict[str, dict], field: str, peak_field: str, phases: Sequence[str]) -> list[tuple]:
    """(phase index, MiB at the end, MiB at the peak) for each phase a variant recorded, above its memory after
    loading; none without that baseline."""
    base = recorded.get("load", {}).get(field)
    out = []
    for position, phase in enumerate(phases):
        record = recorded.get(phase)
        if base is None or record is None or record.get(field) is None:
            continue
        peak = record.get(peak_field)
        out.append(
            (position, (record[field] - base) / MiB, ((peak if peak is not None else record[field]) - base) / MiB)
        )
    return out


def _signed(value: float) -> str:
    return f"{value:+.1f}" if abs(value) < 100 else f"{value:+.0f}"


def plot(records: Sequence[dict], path: str, title: str | None = None) -> str:
    """Draw what each phase after loading (prep, lora, train) adds to the loaded model, per variant: allocated and
    reserved (process RSS where the device has no allocator) at the end of the phase as a solid bar, the phase's
    peak as a pale bar behind it, both labelled, in MiB above the variant's own memory after loading (which the
    legend names); save a PNG to `path`. Needs matplotlib (the "plot" extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'portable-kbit[plot]'") from error

    by_variant = _by_variant(records)
    metrics = _metrics(records)
    phases = [p for p in PLOTTED_PHASES if any(p in v for v in by_variant.values())] or list(PLOTTED_PHASES)
    figure = Figure(figsize=(4.2 * len(metrics) + 3.2, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    width = 0.8 / max(1, len(by_variant))
    rotation = 90 if len(by_variant) > 3 else 0  # narrow bars: horizontal labels would run into each other
    for axis, (field, peak_field, label) in zip(axes, metrics, strict=True):
        bars = {v: _above_load(recorded, field, peak_field, phases) for v, recorded in by_variant.items()}
        span = max((abs(y) for rows in bars.values() for _, *ys in rows for y in ys), default=0.0)
        for index, rows in enumerate(bars.values()):
            color = f"C{index}"
            xs = [position - 0.4 + width * (index + 0.5) for position, _, _ in rows]
            values, peaks = [row[1] for row in rows], [row[2] for row in rows]
            axis.bar(xs, peaks, width=width * 0.9, color=color, alpha=0.3, edgecolor=color, linewidth=0.8)
            axis.bar(xs, values, width=width * 0.9, color=color)
            labels = [(x, value, _signed(value), "black") for x, value in zip(xs, values, strict=True)]
            # the peak's own label where its bar stands clear of the end's
            labels += [
                (x, peak, _signed(peak), "0.35")
                for x, value, peak in zip(xs, values, peaks, strict=True)
                if peak - value > 0.08 * span
            ]
            for x, y, text, shade in labels:
                axis.annotate(
                    text,
                    (x, y),
                    xytext=(0, 2 if y >= 0 else -2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom" if y >= 0 else "top",
                    rotation=rotation,
                    fontsize=7,
                    color=shade,
                )
        axis.axhline(0, color="black", linewidth=0.8)
        axis.margins(y=0.18)
        axis.set_xticks(range(len(phases)), phases)
        axis.set_xlabel("phase (solid: at its end; pale: its peak)")
        axis.set_ylabel(f"{label}: MiB above the loaded model")
        axis.set_title(label, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    handles = []
    for index, (variant, recorded) in enumerate(by_variant.items()):
        failed = next((r for r in recorded.values() if "error" in r), None)
        name = variant if failed is None else f"{variant} (failed in {failed['phase']})"
        loaded = recorded.get("load", {}).get(metrics[0][0])
        where = "" if loaded is None else f" (loaded: {loaded / MiB:,.1f} MiB {metrics[0][2]})"
        handles.append(Patch(color=f"C{index}", label=f"{name}{where}"))
    handles.append(Patch(facecolor="0.85", edgecolor="0.5", label="pale: the peak during the phase"))
    columns = min(3 if len(metrics) > 1 else 2, len(handles))  # no wider than the figure
    figure.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=8)
    if title is None and records:
        first = records[0]
        steps = first.get("steps")
        title = (
            f"{os.path.basename(str(first.get('checkpoint', '')).rstrip(os.sep))} on {first.get('device')} "
            f"({first.get('quantizer')}), {steps} step{'' if steps == 1 else 's'} x {first.get('seq_len')} tokens: "
            "memory each phase adds to the loaded model"
        )
    if title:
        figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=110)
    return path
