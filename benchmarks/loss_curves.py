"""Which activations mode is the default: loss curves of peft's function and each mode of ours, several data seeds.

    python benchmarks/loss_curves.py --preset mistral-7b --steps 40 --seeds 1,2,3 --jobs 6 --out results/h100
    python benchmarks/loss_curves.py --preset tiny --steps 10 --seeds 1,2 --out /tmp/curves    # CPU, seconds

Each (variant, seed) runs `portable_kbit.tools.compare.run_variant` in a fresh process (load, prepare, LoRA r16 on
q/k/v/o, non-reentrant checkpointing, AdamW lr 1e-4, `--steps` steps on one random sequence drawn with the seed);
`--jobs` processes at a time (on one GPU: each has its own allocator, so memory figures stay per process; times do not,
and none are reported here). Writes <out>/curves.jsonl (one record per run: variant, seed, losses, training peak) and
prints, per seed and variant, the mean gap to peft's loss over the steps (ours - peft) and the largest |gap|.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

VARIANTS = ("peft", "ours-fp32", "ours-layer", "ours-native")


def run(path: str, variant: str, seed: int, steps: int, seq_len: int, device: str) -> dict[str, Any]:
    from portable_kbit.tools import compare

    records = compare.run_in_subprocess(path, variant, device, steps, seq_len, "bnb-nf4", data_seed=seed)
    train = next((r for r in records if r.get("phase") == "train"), None)
    failed = next((r for r in records if "error" in r), None)
    return {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "seq_len": seq_len,
        "losses": train.get("losses") if train else None,
        "peak_allocated": train.get("peak_allocated") if train else None,
        "error": failed.get("error") if failed else None,
    }


def gaps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed and variant: the mean of (ours - peft) over the steps, and the largest |ours - peft|."""
    by = {(r["variant"], r["seed"]): r["losses"] for r in records if r["losses"]}
    out = []
    for (variant, seed), losses in sorted(by.items()):
        reference = by.get(("peft", seed))
        if variant == "peft" or reference is None:
            continue
        diff = [a - b for a, b in zip(losses, reference, strict=True)]
        largest = max(abs(d) for d in diff)
        out.append({"variant": variant, "seed": seed, "mean_gap": statistics.fmean(diff), "max_abs_gap": largest})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from portable_kbit.tools import compare

    path = compare.materialize(args.preset, device=args.device)
    seq_len = args.seq_len or compare.PRESETS[args.preset].seq_len
    runs = [(v, int(s)) for s in args.seeds.split(",") for v in args.variants.split(",")]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(lambda vs: run(path, vs[0], vs[1], args.steps, seq_len, args.device), runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    for record in records:
        if record["error"]:
            print(f"{record['variant']} seed {record['seed']}: FAILED {record['error'][:200]}")
    for gap in gaps(records):
        mean, largest = gap["mean_gap"], gap["max_abs_gap"]
        print(f"seed {gap['seed']} {gap['variant']:>12}: mean gap to peft {mean:+.4f}, largest |gap| {largest:.4f}")


if __name__ == "__main__":
    main()
