"""How long the preparation call itself takes: peft's function against prepare() in each mode, on the same model.

    python benchmarks/prepare_time.py --preset mistral-7b --rounds 5 --jobs 4 --out benchmarks/results/h100
    python benchmarks/prepare_time.py --preset tiny --rounds 2 --out /tmp/prep_time                    # CPU

Every measurement is the first call in a fresh process (`portable_kbit.tools.compare.run_variant`, one short training
step after it), with torch, transformers, peft and portable_kbit imported and the model loaded before the clock starts;
the loader's pending garbage collection is run before it too, for every variant alike (compare's load phase). Rounds
visit the variants in a rotating order; `--jobs` processes at a time. Writes <out>/prepare_time.jsonl (one record per
run: variant, round, seconds, and for prepare() the share of the trace forward) and prints the median and the fastest
per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

VARIANTS = ("peft", "ours-fp32", "ours-layer", "ours-native")


def run(path: str, variant: str, index: int, device: str) -> dict[str, Any]:
    from portable_kbit.tools import compare

    records = compare.run_in_subprocess(path, variant, device, 1, 16, "bnb-nf4")
    prep = next((r for r in records if r.get("phase") == "prep"), {})
    report = prep.get("prep_report") or {}
    return {
        "variant": variant,
        "round": index,
        "seconds": prep.get("seconds"),
        "trace_seconds": report.get("trace_seconds"),
        "error": next((r.get("error") for r in records if "error" in r), None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from portable_kbit.tools import compare

    path = compare.materialize(args.preset, device=args.device)
    variants = args.variants.split(",")
    runs = [(variants[(i + k) % len(variants)], k) for k in range(args.rounds) for i in range(len(variants))]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(lambda vk: run(path, vk[0], vk[1], args.device), runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "prepare_time.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    for variant in variants:
        times = [r["seconds"] for r in records if r["variant"] == variant and r["seconds"] is not None]
        traces = [r["trace_seconds"] for r in records if r["variant"] == variant and r["trace_seconds"] is not None]
        if not times:
            print(f"{variant:>12}: no successful run")
            continue
        trace = f", trace median {statistics.median(traces) * 1000:.1f} ms" if traces else ""
        print(
            f"{variant:>12}: median {statistics.median(times) * 1000:.1f} ms, fastest {min(times) * 1000:.1f} ms "
            f"over {len(times)} fresh processes{trace}"
        )


if __name__ == "__main__":
    main()
