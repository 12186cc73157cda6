"""Render benchmark results as docs/benchmarks.md's markdown tables, each figure with its ratio to peft's:
benchmarks/results/<run>/phases.jsonl (portable_kbit.compare), long_fit.jsonl (benchmarks/long_sequences.py: the
longest sequence under an 8 GiB cap, with and without token blocks, and with expandable segments), prepare_time.jsonl
(benchmarks/prepare_time.py) and curves.jsonl (benchmarks/loss_curves.py), where present.

    python benchmarks/table.py benchmarks/results/h100 benchmarks/results/cpu
    python benchmarks/table.py --write docs/benchmarks.md benchmarks/results/h100 benchmarks/results/cpu

--write PATH replaces what stands between the markers ``<!-- benchmark-table:start -->`` and
``<!-- benchmark-table:end -->`` in any markdown file (--readme PATH is its old name, still accepted).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

MiB = 1 << 20
COLUMNS = ("peft", "ours-fp32", "ours-layer", "ours-native", "ours-fp32-upcast", "ours-peft", "peft-noclear", "none")
#: benchmarks/long_sequences.py's variant names -> compare's
FIT_NAMES = {"peft": "peft", "fp32": "ours-fp32", "layer": "ours-layer", "native": "ours-native"}
FIT_ROWS = {
    "": "8 GiB cap: longest sequence",
    "@expandable": "8 GiB cap, expandable segments: longest sequence",
    "+blocks": "8 GiB cap, token_blocks='auto': longest sequence",
}
MARKERS = ("<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->")


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def by_variant(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        out.setdefault(record["variant"], {})[record["phase"]] = record
    return out


def _minus(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else (a - b) / MiB


def metrics(run: dict[str, dict[str, Any]], fit: dict[str, Any], prepare_time: list[float]) -> dict[str, Any]:
    load, prep, train = run.get("load", {}), run.get("prep", {}), run.get("train", {})
    rss = train.get("allocated") is None  # no allocator (CPU): process RSS is the measure
    rows: dict[str, Any] = {}
    if not rss:
        rows["prepare: allocated delta (MiB)"] = _minus(prep.get("allocated"), load.get("allocated"))
        rows["prepare: reserved delta (MiB)"] = _minus(prep.get("reserved"), load.get("reserved"))
        rows["prepare: peak allocated delta (MiB)"] = _minus(prep.get("peak_allocated"), load.get("allocated"))
    rows["prepare: process RSS delta (MiB)"] = _minus(prep.get("process_rss"), load.get("process_rss"))
    rows["prepare: host available delta (MiB)"] = _minus(prep.get("host_available"), load.get("host_available"))
    rows["prepare: seconds"] = prep.get("seconds")
    rows["prepare: seconds, median of fresh processes"] = statistics.median(prepare_time) if prepare_time else None
    if not rss:
        rows["training: peak allocated (MiB)"] = (
            None if train.get("peak_allocated") is None else train["peak_allocated"] / MiB
        )
        rows["training: peak reserved (MiB)"] = (
            None if train.get("peak_reserved") is None else train["peak_reserved"] / MiB
        )
    else:
        rows["training: peak process RSS (MiB)"] = (
            None if train.get("peak_process_rss") is None else train["peak_process_rss"] / MiB
        )
    rows["frozen parameters in fp32"] = prep.get("fp32_frozen_parameters")
    rows["loss at step 5"] = (train.get("losses") or [None])[-1]
    for row in FIT_ROWS.values():
        rows[row] = fit.get(row)
    return rows


RATIO_ROWS = (
    "prepare: seconds",
    "prepare: seconds, median of fresh processes",
    "training: peak allocated (MiB)",
    "training: peak reserved (MiB)",
    "training: peak process RSS (MiB)",
    *FIT_ROWS.values(),
)


def fits_of(folder: Path) -> dict[str, dict[str, Any]]:
    """compare variant -> {row name: longest length}, from long_fit.jsonl (the latest summary of each variant)."""
    out: dict[str, dict[str, Any]] = {}
    for record in read(folder / "long_fit.jsonl"):
        if record.get("phase") != "fit":
            continue
        name = record["variant"]
        for suffix, row in FIT_ROWS.items():
            base = name[: -len(suffix)] if suffix and name.endswith(suffix) else (name if not suffix else None)
            if base in FIT_NAMES and (suffix or ("+" not in name and "@" not in name)):
                out.setdefault(FIT_NAMES[base], {})[row] = record.get("longest")
    return out


def _device_name(folder: Path) -> str | None:
    """The accelerator's name, from whichever result file of the run records it."""
    for path in sorted(folder.glob("*.jsonl")):
        for record in read(path):
            name = record.get("device_name") or (record.get("name") if record.get("backend") else None)
            if name:
                return str(name)
    return None


def curve_gaps(folder: Path) -> str:
    """One line per variant: the mean loss gap to peft over the steps, per data seed (benchmarks/loss_curves.py)."""
    records = read(folder / "curves.jsonl")
    by = {(r["variant"], r["seed"]): r["losses"] for r in records if r.get("losses")}
    seeds = sorted({seed for _, seed in by})
    lines = []
    for variant in dict.fromkeys(v for v, _ in by):
        if variant == "peft":
            continue
        means = []
        for seed in seeds:
            ours, reference = by.get((variant, seed)), by.get(("peft", seed))
            if ours and reference:
                means.append(statistics.fmean(a - b for a, b in zip(ours, reference, strict=True)))
        if means:
            lines.append(f"{variant} " + " / ".join(f"{m:+.4f}" for m in means))
    if not lines:
        return ""
    steps = len(next(iter(by.values())))
    return f"Mean loss gap to peft over {steps} steps, data seeds {', '.join(map(str, seeds))}: " + "; ".join(lines)


def _cell(name: str, value: Any, reference: Any) -> str:
    if value is None:
        return ""
    if name.startswith("prepare: seconds"):
        text = f"{value:.3f}"
    elif name == "loss at step 5":
        text = f"{value:.4f}"
    elif "delta" in name:
        text = f"{value:+.1f}"
    else:
        text = f"{value:.0f}"
    if name in RATIO_ROWS and reference not in (None, 0):
        text += f" ({value / reference:.2f}x)"
    return text


def render_run(folder: Path) -> str:
    phases = by_variant(read(folder / "phases.jsonl"))
    fits = fits_of(folder)
    times: dict[str, list[float]] = {}
    for record in read(folder / "prepare_time.jsonl"):
        if record.get("seconds") is not None:
            times.setdefault(record["variant"], []).append(record["seconds"])
    if not phases:
        return f"(no results in {folder})"
    first = next(iter(phases.values()))
    start = first.get("start", {})
    columns = [c for c in COLUMNS if c in phases]
    table = {c: metrics(phases[c], fits.get(c, {}), times.get(c, [])) for c in columns}
    rows = [name for name in table[columns[0]] if any(table[c][name] is not None for c in columns)]
    versions = ", ".join(f"{k} {v}" for k, v in (start.get("versions") or {}).items() if v and k != "python")
    device_name = start.get("device_name") or _device_name(folder) or start.get("device")
    train = first.get("train", {})
    lines = [
        f"**{folder.name}** ({device_name}; {versions}): {train.get('quantizer')}, {train.get('steps')} steps on one "
        f"{train.get('seq_len')}-token sequence. Ratios are to peft's default (`auto_clear_cache=True`). "
        f"Source: `{folder.as_posix()}/`.",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in rows:
        # token blocks have no peft counterpart: their lengths are compared with peft's under the same cap
        reference_row = FIT_ROWS[""] if name == FIT_ROWS["+blocks"] else name
        cells = [_cell(name, table[c][name], table.get("peft", {}).get(reference_row)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    losses = {c: phases[c].get("train", {}).get("losses") for c in columns}
    if losses.get("peft"):
        # a variant that failed part-way has fewer losses: compare the steps it has
        gaps = {
            c: max(abs(a - b) for a, b in zip(steps, losses["peft"], strict=False))
            for c, steps in losses.items()
            if steps and c != "peft"
        }
        lines += ["", "Largest loss gap to peft over the steps: " + ", ".join(f"{c} {g:.4f}" for c, g in gaps.items())]
    curves = curve_gaps(folder)
    if curves:
        lines += ["", curves]
    errors = [f"{v}/{p}: {r['error']}" for v, run in phases.items() for p, r in run.items() if "error" in r]
    if errors:
        lines += ["", "Failed: " + "; ".join(errors)]
    return "\n".join(lines)


def render(folders: list[Path]) -> str:
    return "\n\n".join(render_run(folder) for folder in folders)


def write_into_page(page: Path, text: str) -> None:
    """Replace what stands between the MARKERS of a markdown page with the tables."""
    content = page.read_text()
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{page} has no {start} ... {end} section")
    page.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument(
        "--write",
        "--readme",
        dest="write",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the tables between the table markers of this markdown page (docs/benchmarks.md; "
        "--readme is the old name)",
    )
    args = parser.parse_args()
    text = render(args.folders)
    if args.write is not None:
        write_into_page(args.write, text)
    print(text)


if __name__ == "__main__":
    main()
