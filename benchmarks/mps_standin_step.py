"""A Mac's attention, stood in for on CUDA: a training step whose attention takes the math kernel, or query blocks.

    python benchmarks/mps_standin_step.py --preset mistral-7b --lengths 4096,8192 --out benchmarks/results/h100
    python benchmarks/mps_standin_step.py --preset tiny --device cpu --lengths 256 --out /tmp/standin     # CPU check

On Apple MPS, training attention runs the math kernel (heads x L x L scores) in every mode; prepare() takes such
calls (1024 query rows or more) over blocks of queries instead (portable_kbit/patches/query_blocks.py). A Mac is not
reachable from here, so this runs a real training step of the preset (bnb nf4, LoRA r16 q/k/v/o, non-reentrant
checkpointing, activations="native") on the device at hand with the backend's attention decisions replaced by the
MPS backend's, per path, each in a fresh process:

- fused: the device as it is (on CUDA, sdpa's fused kernels): the reference;
- math: the MPS decision that attention holds scores, long calls left to sdpa, forced onto the math kernel
  (torch.nn.attention.sdpa_kernel): what a Mac runs without query blocks;
- query-blocks: the MPS decision without the memory-efficient kernel: long calls over blocks of queries.

Per path and length: the peak allocated bytes of the training steps (reset after loading), the median step time of
steps 2..n, the losses, and `report(model).attention_calls` (which path the calls took). Writes
<out>/mps_standin_step.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import long_sequences

PATHS = ("fused", "math", "query-blocks")


def child(args: argparse.Namespace) -> list[dict]:
    import torch

    from portable_kbit import backends, report
    from portable_kbit.backends import base
    from portable_kbit.backends.mps import MpsBackend

    backend_type: Any = type(backends.resolve(args.device).backend)  # its methods are replaced below
    if args.path != "fused":
        # the stand-in: this backend answers the MPS backend's attention questions
        backend_type.attention_holds_scores = MpsBackend.attention_holds_scores
        long_path = base.QUERY_BLOCKS if args.path == "query-blocks" else None

        def long_attention(self: Any, *call: Any) -> str | None:
            return long_path

        backend_type.long_attention = long_attention
    model, target, info = long_sequences.load_prepared(args.checkpoint, "native", args.device)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    records = []
    for seq_len in args.lengths:
        for name, parameter in model.named_parameters():
            if name in start:
                parameter.data.copy_(start[name])
        record: dict[str, Any] = {"path": args.path, "seq_len": seq_len, "steps": args.steps, **info}
        target.backend.reset_peak(target.device)
        kernel: contextlib.AbstractContextManager = contextlib.nullcontext()
        if args.path == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel([SDPBackend.MATH])
        try:
            with kernel:
                record["losses"], seconds = long_sequences.train(model, target, args.steps, seq_len)
            record["step_seconds"] = round(statistics.median(seconds[1:] or seconds), 4)
        except torch.OutOfMemoryError as error:
            record["error"] = f"OutOfMemoryError: {str(error).splitlines()[0][:200]}"
        stats = target.backend.allocator_stats(target.device)
        record["peak_allocated"] = stats.peak_allocated
        done = report(model)
        calls = done.attention_calls if done is not None else None
        record["attention_calls"] = calls.to_dict() if calls is not None else None
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mistral-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from portable_kbit.tools import compare

    checkpoint = compare.materialize(args.preset, device=args.device)
    versions = compare.versions()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "mps_standin_step.jsonl", "a") as sink:
        for path in args.paths.split(","):
            command = [sys.executable, os.path.abspath(__file__), "--child", "--checkpoint", checkpoint]
            command += ["--path", path, "--device", args.device, "--steps", str(args.steps)]
            command += ["--lengths", ",".join(map(str, args.lengths)), "--out", args.out]
            for record in long_sequences.child_records(command, {"path": path}):
                record.update(preset=args.preset, versions=versions)
                sink.write(json.dumps(record) + "\n")
                print(json.dumps({k: v for k, v in record.items() if k not in ("versions", "losses")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
