"""Where a training step's time goes: torch.profiler over one step of each variant of benchmarks/long_sequences.py.

    python benchmarks/profile_step.py --preset mistral-7b --device cuda --variants native,native+blocks \\
        --seq-len 4096 --out benchmarks/results/h100/profile
    python benchmarks/profile_step.py --preset tiny --device cpu --variants native,native+blocks --seq-len 256 \\
        --out /tmp/profile                                                                   # CPU check, seconds

Each variant runs in a fresh process: load and prepare as long_sequences.py does, two warm-up steps, then one profiled
step. Writes <out>/profile.jsonl (per variant: the step's device time in the profiler's kernels, grouped by kind of
kernel, and its wall time) and <out>/profile-<variant>.txt (the profiler's table of the 30 costliest ops by device
self time). Kinds: a kernel's name matched against KINDS in order, so the groups add up to the total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import long_sequences

#: kernel kind by name fragment (lower case), first match wins
KINDS = (
    ("dequantize (bitsandbytes)", ("dequant",)),
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("matmul", ("gemm", "sm90_", "cutlass", "ampere_", "addmm", "mm", "matmul", "bmm")),
    ("copy / cast", ("copy", "cast", "to_copy")),
    ("reduction", ("reduce", "sum", "softmax", "norm", "mean")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "mul", "add", "silu", "pow", "rsqrt")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def child(args: argparse.Namespace) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    model, target, info = long_sequences.load_prepared(args.checkpoint, args.variant, args.device, args.lora)
    long_sequences.train(model, target, 2, args.seq_len)
    on_cuda = target.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        long_sequences.train(model, target, 1, args.seq_len)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    attribute = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    by_kind: dict[str, float] = {}
    for event in events:
        if on_cuda and getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        micros = float(getattr(event, attribute, 0.0) or 0.0)
        if micros:
            by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + micros / 1e6
    sort_by = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"profile-{args.variant}.txt").write_text(events.table(sort_by=sort_by, row_limit=30))
    return {
        "variant": args.variant,
        "seq_len": args.seq_len,
        "lora": args.lora,
        "wall_seconds": round(wall, 4),
        "device_seconds_by_kind": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "device_seconds": round(sum(by_kind.values()), 4),
        **info,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mistral-7b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default="native,native+blocks")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--lora", choices=sorted(long_sequences.LORA), default="qkvo-r16")
    parser.add_argument("--out", required=True)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    from portable_kbit.tools import compare

    checkpoint = compare.materialize(args.preset, device=args.device)
    versions = compare.versions()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "profile.jsonl", "a") as sink:
        for variant in args.variants.split(","):
            command = [sys.executable, os.path.abspath(__file__), "--child", "--checkpoint", checkpoint]
            command += ["--variant", variant, "--device", args.device, "--seq-len", str(args.seq_len)]
            command += ["--lora", args.lora, "--out", args.out]
            record = long_sequences.child_records(command, {"variant": variant})[-1]
            record.update(preset=args.preset, versions=versions)
            sink.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
