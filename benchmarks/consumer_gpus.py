"""Llama-3.1-8B on consumer GPUs: the longest sequence per memory cap and configuration, beside unsloth's published
context lengths and Hugging Face + FA2's.

The runs are benchmarks/long_sequences.py fits, one folder per cap (benchmarks/gpu_run.sh stages consumer-fit-12 and
consumer-fit-16):

    python benchmarks/long_sequences.py --preset llama-3.1-8b --lora all-r32 --cap-gib 12 --measure fit \\
        --variants peft,native+blocks+offload,fp32+blocks+offload --fit-lengths 21848,32768 --steps 2 --out DIR/fit12
    python benchmarks/consumer_gpus.py DIR/fit12 DIR/fit16 --out benchmarks/results/h100/consumer_gpus

The setting is unsloth's (its blog's table, below): Llama 3.1 8B, 4-bit QLoRA on every linear layer of the decoder
layers (q, k, v, o, gate, up, down) at rank 32, batch 1. Ours: bitsandbytes nf4 with double quant, random weights of
the real shape (the `llama-3.1-8b` preset: vocabulary 128256, llama3 rope scaling), non-reentrant checkpointing, one
fresh process per (configuration, length), its allocator capped at the cap (torch.cuda.set_per_process_memory_fraction
on an H100; the CUDA context, a few hundred MiB, is outside the cap).

A length probe tells "fits" or "does not fit" for that length; the table shows, per configuration, the longest length
that fitted and the shortest that did not (">= N" where every length tried fitted).

With --forecasts (the JSON lines of `portable-kbit fit llama-3.1-8b --budget 12GiB --lora-rank 32 --lora-targets
... --json-out FILE`, one file per cap), a second table puts the forecast beside each measured length: the predicted
and measured peak allocated, their ratio, and whether the forecast said the length fits.

Writes <out>.md (the tables) and <out>.png (the longest length per cap and configuration, where matplotlib is
installed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: unsloth's blog "Llama 3.3 + ..." (https://unsloth.ai/blog/llama3-3, December 2024): Llama 3.1 (8B) maximum
#: context length per GPU memory, QLoRA rank 32 on all linear layers, batch size 1 (its table; for 8 GB its text says
#: "up to 2,900" and that HF + FA2 goes out of memory)
PUBLISHED = {
    8: {"unsloth": 2900, "hf+fa2": 0},
    12: {"unsloth": 21848, "hf+fa2": 932},
    16: {"unsloth": 40724, "hf+fa2": 2551},
}
SOURCE = "https://unsloth.ai/blog/llama3-3"
MiB, GiB = 1 << 20, 1 << 30


def read(folders: list[str]) -> dict[int, dict[str, dict]]:
    """cap GiB -> configuration -> {"fitted": [lengths], "failed": [lengths], "errors": [...], "peaks": {}}. A length
    measured again in a later folder (newer code, or a harness fixed) replaces the earlier folder's verdict on that
    length; the other lengths of the earlier folder stay."""
    by_length: dict[tuple[int, str], dict[int, dict]] = {}
    for folder in folders:
        for line in (Path(folder) / "long_fit.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("phase") != "fit-length":
                continue
            key = (round(record.get("cap_mib", 0) / 1024), record["variant"])
            by_length.setdefault(key, {})[record["seq_len"]] = record
    out: dict[int, dict[str, dict]] = {}
    for (cap, variant), records in by_length.items():
        entry: dict = {"fitted": [], "failed": [], "errors": [], "peaks": {}}
        for seq_len, record in sorted(records.items()):
            (entry["fitted"] if record.get("fits") else entry["failed"]).append(seq_len)
            if record.get("fits") and record.get("peak_allocated"):
                entry["peaks"][seq_len] = record["peak_allocated"]
            if record.get("error"):
                entry["errors"].append(record["error"])
        out.setdefault(cap, {})[variant] = entry
    return out


def cell(entry: dict | None) -> str:
    if not entry:
        return "not run"
    fitted, failed = max(entry["fitted"], default=None), min(entry["failed"], default=None)
    if fitted is None:
        text = f"< {failed:,}" if failed else "?"
    elif failed is None:
        text = f">= {fitted:,}"
    else:
        text = f"{fitted:,} ({failed:,} does not)"
    return text + (" (error)" if entry["errors"] else "")


def table(results: dict[int, dict[str, dict]]) -> str:
    configurations = sorted({v for by in results.values() for v in by}, key=lambda v: (v != "peft", v))
    head = ["cap", *configurations, "unsloth (published)", "HF + FA2 (published)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cap in sorted(results):
        published = PUBLISHED.get(cap, {})
        row = [f"{cap} GiB", *(cell(results[cap].get(v)) for v in configurations)]
        row += [f"{published['unsloth']:,}" if published else "-"]
        row += [(f"{published['hf+fa2']:,}" if published.get("hf+fa2") else "out of memory") if published else "-"]
        lines.append("| " + " | ".join(row) + " |")
    errors = sorted({e for by in results.values() for entry in by.values() for e in entry["errors"]})
    notes = [f"Published figures: {SOURCE}."] + [f"Error: {e}" for e in errors[:5]]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def read_forecasts(paths: list[str]) -> dict[tuple[int, str], dict]:
    """(cap GiB, configuration) -> the forecast record of `portable-kbit fit --json-out`."""
    out = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "forecast" and record.get("budget_bytes"):
                out[(round(record["budget_bytes"] / GiB), record["mode"])] = record
    return out


def forecast_table(results: dict[int, dict[str, dict]], forecasts: dict[tuple[int, str], dict]) -> str:
    """Per cap, configuration and measured length: the forecast's peak and verdict beside the measurement."""
    from portable_kbit.tools.fit import allocatable

    head = ["cap", "configuration", "forecast: longest", "length", "predicted peak", "measured peak", "ratio"]
    head += ["forecast says", "measured"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios, disagreements = [], 0
    for (cap, mode), record in sorted(forecasts.items()):
        entry = results.get(cap, {}).get(mode)
        if not entry:
            continue
        predicted = {int(k): v for k, v in record["peak_bytes"].items()}
        for seq_len in sorted(set(entry["fitted"]) | set(entry["failed"])):
            if seq_len not in predicted:
                continue
            says = predicted[seq_len] <= allocatable(record)
            trained = seq_len in entry["fitted"]
            disagreements += says != trained
            measured = entry["peaks"].get(seq_len)
            ratio = predicted[seq_len] / measured if measured else None
            if ratio is not None:
                ratios.append(ratio)
            longest = record.get("longest_seq_len")
            row = [f"{cap} GiB", mode, f"{longest:,}" if longest else "none", f"{seq_len:,}"]
            row += [f"{predicted[seq_len] / MiB:,.0f} MiB", f"{measured / MiB:,.0f} MiB" if measured else "-"]
            row += [f"{ratio:.3f}" if ratio else "-", "fits" if says else "does not fit"]
            row += ["trains" if trained else "out of memory"]
            lines.append("| " + " | ".join(row) + " |")
    if len(lines) == 2:
        return ""
    worst = max((abs(r - 1) for r in ratios), default=None)
    summary = f"Predicted / measured peak: {len(ratios)} lengths, worst {worst:.1%} off" if ratios else "No peaks"
    summary += f"; the forecast's verdict disagrees with the measurement at {disagreements} length(s)."
    note = (
        "The forecast's verdict compares the predicted peak with the budget's allocatable part "
        "(`Backend.allocatable_fraction`: 0.90 of the cap on CUDA); the measured peak is the largest of the "
        "length's steps (docs/will-it-fit.md)."
    )
    return "\n".join(lines) + "\n\n" + summary + " " + note + "\n"


def plot(results: dict[int, dict[str, dict]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"no plot: {error}"
    caps = sorted(results)
    configurations = sorted({v for by in results.values() for v in by}, key=lambda v: (v != "peft", v))
    series = {v: [max(results[c].get(v, {}).get("fitted", []), default=0) for c in caps] for v in configurations}
    series["unsloth (published)"] = [PUBLISHED.get(c, {}).get("unsloth", 0) for c in caps]
    series["HF + FA2 (published)"] = [PUBLISHED.get(c, {}).get("hf+fa2", 0) for c in caps]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        axes.bar([x + i * width for x in range(len(caps))], values, width, label=name)
    axes.set_xticks([x + 0.4 - width / 2 for x in range(len(caps))], [f"{c} GiB" for c in caps])
    axes.set_ylabel("longest sequence that trained (tokens)")
    axes.set_title("Llama-3.1-8B shape, QLoRA r32 on all linear layers, batch 1")
    axes.set_ylim(0, 1.3 * max((max(v) for v in series.values()), default=1))  # room for the legend above the bars
    axes.legend(fontsize=7, loc="upper left", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "folders",
        nargs="+",
        help="long_sequences.py --out folders, oldest first (a later one replaces the lengths it remeasured)",
    )
    parser.add_argument("--forecasts", nargs="*", default=[], help="`portable-kbit fit --json-out` files")
    parser.add_argument("--out", required=True, help="path without suffix: writes .md and .png")
    args = parser.parse_args(argv)
    results = read(args.folders)
    text = table(results)
    if args.forecasts:
        text += "\n## Forecasts beside the measurements\n\n" + forecast_table(results, read_forecasts(args.forecasts))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    print(text)
    problem = plot(results, out.with_suffix(".png"))
    if problem:
        print(problem, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
