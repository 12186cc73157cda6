"""The Mistral-7B QLoRA workload, peft vs portable_kbit, side by side in one run (README, "Benchmarks").

    python benchmarks/mistral7b_qlora.py --preset mistral-7b --fit --out benchmarks/results/h100   # on the GPU
    python benchmarks/mistral7b_qlora.py --preset small --out benchmarks/results/cpu               # 2-core CPU
    python benchmarks/table.py --readme README.md benchmarks/results/h100 benchmarks/results/cpu

The phases come from `portable_kbit.compare` (the `portable-kbit compare` command): a random-weight checkpoint of the
preset's shape is built locally (no download), then each variant runs in a fresh process: load (bitsandbytes nf4 +
double quant, compute bf16), prepare, LoRA r=16 on q,k,v,o, non-reentrant gradient checkpointing, model.train(),
5 AdamW steps (lr 1e-4) on one sequence; one JSON line per phase in <out>/phases.jsonl. With --fit (CUDA) each of
peft, ours-fp32 and ours-native also gets the longest sequence (multiples of 256) that loads, prepares and trains
5 steps with the allocator capped at 8 GiB, in <out>/fit.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30
FIT_VARIANTS = ("peft", "ours-fp32", "ours-native")


def longest_sequence(checkpoint: str, variant: str, device: str, cap_bytes: int, start: int, stop: int) -> dict:
    """In this process: cap the allocator, load, prepare, attach LoRA, then 5 steps at start, start+256, ... until
    one runs out of memory. Returns the fit record."""
    import torch
    from peft import LoraConfig, get_peft_model

    from portable_kbit import backends, compare, tiny

    target = backends.resolve(device)
    total = torch.cuda.get_device_properties(target.device).total_memory
    compare.cap_memory(target, cap_bytes / total)
    targets = compare.lora_targets(checkpoint)
    model = tiny.load(checkpoint, "bnb-nf4", str(target.device))
    model = compare.prepare_variant(model, variant, target, targets, {})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    fitted, out_of_memory_at = None, None
    for seq_len in range(start, stop + 1, 256):
        try:
            compare.train_steps(model, target, 5, seq_len, 1e-4, [])
        except torch.OutOfMemoryError:
            out_of_memory_at = seq_len
            break
        fitted = seq_len
    return {
        "variant": variant,
        "phase": "fit",
        "cap_mib": cap_bytes >> 20,
        "longest": fitted,
        "out_of_memory_at": out_of_memory_at,
        "tried_up_to": stop,
        "versions": compare.versions(),
        "device_name": torch.cuda.get_device_name(target.device),
    }


def run(args: argparse.Namespace) -> None:
    from portable_kbit import compare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"# {message} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    checkpoint = compare.materialize(args.preset, device=args.device)
    log(f"checkpoint ready: {checkpoint}")
    if args.fit_only:
        args.fit = True
    else:
        run_phases(args, checkpoint, out)
        log("phases done")
    if args.fit:
        run_fits(args, checkpoint, out, log)


def run_phases(args: argparse.Namespace, checkpoint: str, out: Path) -> None:
    from portable_kbit import compare

    with open(out / "phases.jsonl", "w") as sink:

        def emit(record: dict) -> None:
            sink.write(json.dumps(record) + "\n")
            sink.flush()

        compare.compare(
            checkpoint,
            device=args.device,
            variants=args.variants.split(","),
            emit=emit,
            steps=args.steps,
            seq_len=args.seq_len or compare.PRESETS[args.preset].seq_len,
        )


def run_fits(args: argparse.Namespace, checkpoint: str, out: Path, log) -> None:
    with open(out / "fit.jsonl", "w") as sink:
        for variant in FIT_VARIANTS:
            process = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--fit-one",
                    variant,
                    "--checkpoint",
                    checkpoint,
                    "--device",
                    args.device,
                    "--fit-start",
                    str(args.fit_start),
                    "--fit-stop",
                    str(args.fit_stop),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
            sink.writelines(line + "\n" for line in lines)
            log(f"fit {variant}: {lines[-1] if lines else process.stderr[-800:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="mistral-7b", help="a portable_kbit.compare preset (mistral-7b, small, tiny)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/run")
    parser.add_argument("--variants", default="none,peft-noclear,peft,ours-fp32,ours-native,ours-peft")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's (512 for mistral-7b)")
    parser.add_argument("--fit", action="store_true", help="also find the longest sequence under an 8 GiB cap (CUDA)")
    parser.add_argument("--fit-only", action="store_true", help="only the fit search (phases.jsonl kept as it is)")
    parser.add_argument("--fit-start", type=int, default=1024)
    parser.add_argument("--fit-stop", type=int, default=6144)
    parser.add_argument("--fit-one", default=None, help=argparse.SUPPRESS)  # internal: one fit, in this process
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fit_one:
        record: dict[str, Any] = longest_sequence(
            args.checkpoint, args.fit_one, args.device, 8 * GiB, args.fit_start, args.fit_stop
        )
        print(json.dumps(record), flush=True)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
