"""Render benchmark results (benchmarks/results/<run>/phases.jsonl from portable_kbit.compare, fit.jsonl) as the
README's markdown table, each figure with its ratio to peft's.

    python benchmarks/table.py benchmarks/results/h100 benchmarks/results/cpu
    python benchmarks/table.py --readme README.md benchmarks/results/h100 benchmarks/results/cpu   # rewrite in place
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

MiB = 1 << 20
COLUMNS = ("peft", "ours-fp32", "ours-native", "ours-peft", "peft-noclear", "none")
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


def metrics(run: dict[str, dict[str, Any]], fit: dict[str, Any]) -> dict[str, Any]:
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
    rows["8 GiB cap: longest sequence"] = fit.get("longest")
    return rows


RATIO_ROWS = (
    "prepare: seconds",
    "training: peak allocated (MiB)",
    "training: peak reserved (MiB)",
    "training: peak process RSS (MiB)",
    "8 GiB cap: longest sequence",
)


def _cell(name: str, value: Any, reference: Any) -> str:
    if value is None:
        return ""
    if name == "prepare: seconds":
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
    fits = {r["variant"]: r for r in read(folder / "fit.jsonl")}
    if not phases:
        return f"(no results in {folder})"
    first = next(iter(phases.values()))
    start = first.get("start", {})
    columns = [c for c in COLUMNS if c in phases]
    table = {c: metrics(phases[c], fits.get(c, {})) for c in columns}
    rows = [name for name in table[columns[0]] if any(table[c][name] is not None for c in columns)]
    versions = ", ".join(f"{k} {v}" for k, v in (start.get("versions") or {}).items() if v and k != "python")
    device_name = next((f["device_name"] for f in fits.values() if "device_name" in f), start.get("device"))
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
        cells = [_cell(name, table[c][name], table.get("peft", {}).get(name)) for c in columns]
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
    errors = [f"{v}/{p}: {r['error']}" for v, run in phases.items() for p, r in run.items() if "error" in r]
    if errors:
        lines += ["", "Failed: " + "; ".join(errors)]
    return "\n".join(lines)


def render(folders: list[Path]) -> str:
    return "\n\n".join(render_run(folder) for folder in folders)


def write_into_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme} has no {start} ... {end} section")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args()
    text = render(args.folders)
    if args.readme is not None:
        write_into_readme(args.readme, text)
    print(text)


if __name__ == "__main__":
    main()
