"""Which activations mode is the default: loss curves of peft's function and each mode of ours, several data seeds.

    python benchmarks/loss_curves.py --preset mistral-7b --steps 40 --seeds 1,2,3 --jobs 6 --out results/h100
    python benchmarks/loss_curves.py --preset tiny --steps 10 --seeds 1,2 --out /tmp/curves    # CPU, seconds
    python benchmarks/loss_curves.py --preset small --task progressions --steps 40 --plot --out /tmp/curves

Two tasks (`--task`, portable_kbit.tools.compare.TASKS): `one-sequence` learns one random sequence by heart; and
`progressions` learns a rule, on a fixed batch of 8 sequences, each an arithmetic progression of token ids with its own
stride, and is scored after every step on 8 held-out progressions (`eval_losses`): a task with signal, on which a flow
that learns more slowly shows as a gap that lasts.

Each (variant, seed) runs `portable_kbit.tools.compare.run_variant` in a fresh process (load, prepare, LoRA r16 on
q/k/v/o, non-reentrant checkpointing, AdamW at `--lr` (default 1e-4), `--steps` steps on one random sequence drawn
with the seed);
`--jobs` processes at a time (on one GPU: each has its own allocator, so memory figures stay per process; times do not,
and none are reported here). Writes <out>/curves.jsonl (one record per run: variant, seed, losses, training peak) and
prints, per seed and variant, the mean gap to peft's loss over the steps (ours - peft) and the largest |gap|.

A variant named with a repeat number (`peft#2`) runs that variant again in its own process: `--variants
peft,peft#2,ours-fp32,ours-mixed` measures peft's own run-to-run spread in the same call (CUDA kernels with atomics
make two identical runs differ), and a flow is then judged against the bar or against that spread, whichever is larger
(`verdicts`: "within" per seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing it (run 8 lost its curves to that)

VARIANTS = ("peft", "ours-fp32", "ours-mixed", "ours-layer", "ours-native")
#: the issue's bar for a flow to count as keeping peft's curve: the 40-step mean gap, per seed
BAR = 0.02


def base_variant(name: str) -> str:
    """'peft#2' -> 'peft': a repeat runs the variant it names."""
    return name.split("#", 1)[0]


def run(
    path: str, variant: str, seed: int, steps: int, seq_len: int, device: str, task: str, lr: float = 1e-4
) -> dict[str, Any]:
    from portable_kbit.tools import compare

    records = compare.run_in_subprocess(
        path, base_variant(variant), device, steps, seq_len, "bnb-nf4", data_seed=seed, task=task, lr=lr
    )
    train = next((r for r in records if r.get("phase") == "train"), None)
    failed = next((r for r in records if "error" in r), None)
    return {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "seq_len": seq_len,
        "task": task,
        "lr": lr,
        "losses": train.get("losses") if train else None,
        "eval_losses": train.get("eval_losses") if train else None,
        "peak_allocated": train.get("peak_allocated") if train else None,
        "error": failed.get("error") if failed else None,
    }


def gaps(records: list[dict[str, Any]], field: str = "losses") -> list[dict[str, Any]]:
    """Per seed and variant: the mean of (ours - peft) over the steps, and the largest |ours - peft|."""
    by = {(r["variant"], r["seed"]): r[field] for r in records if r.get(field)}
    out = []
    for (variant, seed), losses in sorted(by.items()):
        reference = by.get(("peft", seed))
        if variant == "peft" or reference is None:
            continue
        diff = [a - b for a, b in zip(losses, reference, strict=True)]
        largest = max(abs(d) for d in diff)
        out.append({"variant": variant, "seed": seed, "mean_gap": statistics.fmean(diff), "max_abs_gap": largest})
    return out


def verdicts(records: list[dict[str, Any]], field: str = "losses", bar: float = BAR) -> dict[str, list[dict]]:
    """Per variant other than peft's repeats: per seed, its mean gap, what is allowed (the bar, or peft's own spread
    on that seed where a repeat of peft ran and moved more), and whether |gap| is within it."""
    all_gaps = gaps(records, field)
    spread: dict[int, float] = {}
    for gap in all_gaps:
        if base_variant(gap["variant"]) == "peft":
            spread[gap["seed"]] = max(spread.get(gap["seed"], 0.0), abs(gap["mean_gap"]))
    out: dict[str, list[dict]] = {}
    for gap in all_gaps:
        if base_variant(gap["variant"]) == "peft":
            continue
        allowed = max(bar, spread.get(gap["seed"], 0.0))
        out.setdefault(gap["variant"], []).append(
            {
                "seed": gap["seed"],
                "mean_gap": gap["mean_gap"],
                "allowed": allowed,
                "within": abs(gap["mean_gap"]) <= allowed,
            }
        )
    return out


def gaps_per_step(records: list[dict[str, Any]], field: str = "losses") -> dict[str, list[float]]:
    """Per variant: (ours - peft) at each step, the mean over the seeds both ran."""
    by = {(r["variant"], r["seed"]): r[field] for r in records if r.get(field)}
    out: dict[str, list[float]] = {}
    for variant in sorted({v for v, _ in by} - {"peft"}):
        pairs = [(by[(variant, s)], by[("peft", s)]) for v, s in by if v == variant and ("peft", s) in by]
        if pairs:
            out[variant] = [statistics.fmean(a[i] - b[i] for a, b in pairs) for i in range(len(pairs[0][0]))]
    return out


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """The curves (thin: each seed; thick: their mean), and below them each variant's gap to peft per step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fields = ["losses"] + (["eval_losses"] if any(r.get("eval_losses") for r in records) else [])
    figure = Figure(figsize=(6 * len(fields), 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(fields), squeeze=False, sharex=True)
    variants = list(dict.fromkeys(r["variant"] for r in records))
    colours = {v: f"C{i}" for i, v in enumerate(variants)}
    for column, field in enumerate(fields):
        curves, gap_axis = axes[0][column], axes[1][column]
        for variant in variants:
            runs = [r[field] for r in records if r["variant"] == variant and r.get(field)]
            for losses in runs:
                curves.plot(range(1, len(losses) + 1), losses, color=colours[variant], alpha=0.3, linewidth=0.8)
            if runs:
                mean = [statistics.fmean(step) for step in zip(*runs, strict=True)]
                curves.plot(range(1, len(mean) + 1), mean, color=colours[variant], linewidth=2, label=variant)
        for variant, gap in gaps_per_step(records, field).items():
            gap_axis.plot(range(1, len(gap) + 1), gap, color=colours[variant], linewidth=2, label=variant)
        gap_axis.axhline(0, color="black", linewidth=0.8)
        name = "training loss" if field == "losses" else "held-out loss"
        curves.set_title(f"{name} (thin: each seed; thick: their mean)", fontsize=10)
        curves.set_ylabel(name)
        gap_axis.set_ylabel(f"{name}: variant - peft")
        gap_axis.set_xlabel("step")
        curves.grid(alpha=0.3)
        gap_axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--task", default="one-sequence", help="one-sequence or progressions")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--plot", action="store_true", help="also <out>/curves-<task>.png (needs matplotlib)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from portable_kbit.tools import compare

    path = compare.materialize(args.preset, device=args.device)
    seq_len = args.seq_len or compare.PRESETS[args.preset].seq_len
    runs = [(v, int(s)) for s in args.seeds.split(",") for v in args.variants.split(",")]

    def run_and_say(variant_seed: tuple[str, int]) -> dict:
        record = run(path, variant_seed[0], variant_seed[1], args.steps, seq_len, args.device, args.task, args.lr)
        print("record: " + json.dumps(record), flush=True)  # each as it ends: a run cut short keeps what finished
        return record

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(run_and_say, runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "curves" if args.task == "one-sequence" else f"curves-{args.task}"
    with open(out / f"{name}.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    for record in records:
        if record["error"]:
            print(f"{record['variant']} seed {record['seed']}: FAILED {record['error'][:200]}")
    for field in ("losses", "eval_losses"):
        for gap in gaps(records, field):
            mean, largest = gap["mean_gap"], gap["max_abs_gap"]
            print(
                f"{field:>11} seed {gap['seed']} {gap['variant']:>12}: mean gap to peft {mean:+.4f}, "
                f"largest |gap| {largest:.4f}"
            )
    for variant, per_seed in verdicts(records).items():
        said = ", ".join(
            f"seed {v['seed']} {v['mean_gap']:+.4f} ({'within' if v['within'] else 'beyond'} {v['allowed']:.4f})"
            for v in per_seed
        )
        print(f"{variant}: {'keeps' if all(v['within'] for v in per_seed) else 'does not keep'} peft's curve: {said}")
    if args.plot:
        title = f"{args.preset}, {args.task}, {args.steps} steps x {seq_len} tokens, seeds {args.seeds}"
        plot(records, out / f"{name}.png", title)
        print(f"plot: {out / f'{name}.png'}")


if __name__ == "__main__":
    main()
