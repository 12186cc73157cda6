"""Render benchmark JSON lines (benchmarks/results/<run>/phases.jsonl, fit.jsonl) as the README's markdown table.

    python benchmarks/table.py benchmarks/results/h100 benchmarks/results/cpu
    python benchmarks/table.py --readme README.md benchmarks/results/h100 benchmarks/results/cpu   # rewrite in place
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Optional

MiB = 1 << 20
COLUMNS = ("peft", "ours-fp32", "ours-native", "ours-peft", "peft-noclear", "none")
MARKERS = ("<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->")


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def by_variant(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:  # the last run of a variant wins
        out.setdefault(record["variant"], {})[record["phase"]] = record
    return out


def _mib(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / MiB


def metrics(phases: dict[str, dict[str, Any]], fit: dict[str, dict[str, Any]], variant: str) -> dict[str, Any]:
    run = phases.get(variant, {})
    attached, trained = run.get("lora_attached", {}), run.get("trained", {})
    delta = attached.get("prepare_delta", {})
    return {
        "prepare: allocated delta (MiB)": _mib(delta.get("allocated")),
        "prepare: reserved delta (MiB)": _mib(delta.get("reserved")),
        "prepare: peak allocated delta (MiB)": _mib(delta.get("peak_allocated")),
        "prepare: process RSS delta (MiB)": _mib(delta.get("process_rss")),
        "prepare: seconds": run.get("prepared", {}).get("seconds"),
        "training: peak allocated (MiB)": _mib(trained.get("peak_allocated")),
        "training: peak reserved (MiB)": _mib(trained.get("peak_reserved")),
        "training: process RSS after (MiB)": _mib(trained.get("process_rss")),
        "frozen parameters in fp32": attached.get("fp32_base_params"),
        "loss at step 5": (trained.get("losses") or [None])[-1],
        "8 GiB cap: longest sequence": fit.get(variant, {}).get("fit_result", {}).get("longest"),
    }


def _format(value: Any, reference: Any, name: str) -> str:
    if value is None:
        return ""
    text = f"{value:.3f}" if name == "prepare: seconds" else f"{value:.4f}" if name == "loss at step 5" else (
        f"{value:+.1f}" if "delta" in name else f"{value:.0f}" if isinstance(value, float) else str(value))
    ratio_rows = ("seconds", "peak allocated (MiB)", "peak reserved", "longest", "RSS after")
    if reference not in (None, 0) and any(key in name for key in ratio_rows) and "delta" not in name:
        text += f" ({value / reference:.2f}x)"
    return text


def render_run(folder: Path) -> str:
    phases, fit = by_variant(read(folder / "phases.jsonl")), by_variant(read(folder / "fit.jsonl"))
    if not phases:
        return f"(no results in {folder})"
    start = next(iter(phases.values())).get("start", {})
    columns = [c for c in COLUMNS if c in phases]
    table = {c: metrics(phases, fit, c) for c in columns}
    reference = table.get("peft", {})
    rows = [name for name in table[columns[0]] if any(table[c][name] is not None for c in columns)]
    versions = ", ".join(f"{k} {v}" for k, v in (start.get("versions") or {}).items() if v)
    seq_len = next(iter(phases.values())).get("trained", {}).get("seq_len")
    lines = [
        f"**{folder.name}**: {start.get('device_name', '?')}; {versions}; sequence {seq_len}. "
        f"Ratios are against peft's default (`auto_clear_cache=True`). Source: `{folder.as_posix()}`.",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in rows:
        lines.append(f"| {name} | " + " | ".join(_format(table[c][name], reference.get(name), name) for c in columns) + " |")
    losses = {c: phases[c].get("trained", {}).get("losses") for c in columns}
    if losses.get("peft"):
        gaps = {c: max(abs(a - b) for a, b in zip(l, losses["peft"])) for c, l in losses.items() if l and c != "peft"}
        lines += ["", "Largest loss gap to peft over the steps: " + ", ".join(f"{c} {g:.4f}" for c, g in gaps.items())]
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
