"""How good is portable_kbit.forecast()? Predicted against measured training-step peaks, and the longest length under a
budget against the measured fit, for peft's preparation and each prepare(activations=...) mode.

    python benchmarks/forecast_accuracy.py --preset mistral-7b --device cuda --out benchmarks/results/h100
    python benchmarks/forecast_accuracy.py --preset tiny --device cpu --budget 3MiB --seq-lens 64,128,256 --out /tmp/fa

Per variant (peft, then ours-<mode> for every mode in portable_kbit.prepare.ACTIVATIONS), the variants' processes
running side by side (--jobs; each process under its own memory_guard so that none can take the others' memory):

1. one fresh process: load the checkpoint (bitsandbytes nf4 + double quant), prepare, LoRA r16 on the attention
   projections, non-reentrant checkpointing; ``forecast()`` at --seq-lens under --budget, timed, with the allocator's
   peak during the call (what the forecast itself allocated); then a real training step at each length (the
   forecast's own protocol: optimizer state made first, then forward, backward, AdamW step), its peak allocated.
2. the measured fit: fresh processes, one per length, each capped at the budget with memory_guard, around the
   predicted longest length (256 steps up or down, then bisection): the longest length whose --probe-steps steps
   run. On a device that cannot be capped (CPU) a length fits when its measured peak (bytes of live tensors) is
   within the budget.

Writes <out>/forecast_accuracy.jsonl: one JSON line per forecast, measurement, probe, and a "summary" line per variant
(predicted/measured ratios, predicted and measured longest length, forecast seconds and device bytes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STEP = 256


# ---- in a child process -------------------------------------------------------------------------------------------


def load_variant(checkpoint: str, variant: str, device: str, quantizer: str, rank: int) -> tuple[Any, Any]:
    """The model as it will be trained for one variant: (model, target)."""
    from peft import LoraConfig, get_peft_model

    import portable_kbit
    from portable_kbit import backends
    from portable_kbit.tools import compare, presets, tiny

    target = backends.resolve(device)
    targets = presets.lora_targets(checkpoint)
    model = tiny.load(checkpoint, quantizer, str(target.device))
    if variant == "peft":
        model = compare.prepare_variant(model, "peft", target, targets, {})
    else:
        model = portable_kbit.prepare(
            model,
            str(target.device),
            target_modules=targets,
            activations=variant.removeprefix("ours-"),
            gradient_checkpointing_kwargs=compare.CHECKPOINTING,
        )
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))
    return model, target


def child_measure(args: argparse.Namespace) -> None:
    """Forecast, then measure each length, in this process; JSON lines on stdout."""
    import importlib

    import portable_kbit

    forecasting = importlib.import_module("portable_kbit.memory.forecast")
    if args.cap_bytes:
        portable_kbit.memory_guard(device=args.device, cap_bytes=args.cap_bytes)
    model, target = load_variant(args.checkpoint, args.variant, args.device, args.quantizer, args.lora_rank)
    backend, device = target.backend, target.device
    lengths = [int(x) for x in args.seq_lens.split(",")]
    backend.synchronize(device)
    backend.reset_peak(device)
    before = backend.allocator_stats(device)
    started = time.perf_counter()
    forecast = portable_kbit.forecast(model, lengths, 1, args.budget, device=str(device))
    seconds = time.perf_counter() - started
    after = backend.allocator_stats(device)
    device_bytes = None
    if after.peak_allocated is not None and before.allocated is not None:
        device_bytes = after.peak_allocated - before.allocated
    emit(
        {
            "kind": "forecast",
            "variant": args.variant,
            "checkpoint": args.checkpoint,
            "quantizer": args.quantizer,
            "lora_rank": args.lora_rank,
            "forecast_seconds": round(seconds, 3),
            "forecast_device_bytes": device_bytes,
            **forecast.to_dict(),
        }
    )
    token = forecasting.token_for(model)
    for seq_len in lengths:
        measured = forecasting.measure_step(model, target, seq_len, 1, token)
        emit(
            {
                "kind": "measured",
                "variant": args.variant,
                "seq_len": seq_len,
                "measured_bytes": measured.peak_bytes,
                "measured_by": measured.source,
                "live_tensor_bytes": measured.live_tensor_peak,
                "predicted_bytes": forecast.peak_bytes[seq_len],
            }
        )


def child_probe(args: argparse.Namespace) -> None:
    """--probe-steps real steps at --seq-len under a cap of --budget bytes, in this fresh process (the allocator's
    cache carries over from step to step, as in training); one JSON line with the highest peak."""
    import importlib

    import torch

    import portable_kbit

    forecasting = importlib.import_module("portable_kbit.memory.forecast")
    record: dict[str, Any] = {"kind": "probe", "variant": args.variant, "seq_len": args.seq_len}
    record["steps"] = args.probe_steps
    guard = portable_kbit.memory_guard(device=args.device, cap_bytes=args.budget) if can_cap(args.device) else None
    record["capped"] = guard is not None
    try:
        model, target = load_variant(args.checkpoint, args.variant, args.device, args.quantizer, args.lora_rank)
        token = forecasting.token_for(model)
        peak = max(
            forecasting.measure_step(model, target, args.seq_len, 1, token).peak_bytes for _ in range(args.probe_steps)
        )
        record["measured_bytes"] = peak
        record["fits"] = guard is not None or peak <= args.budget
    except torch.OutOfMemoryError as error:
        record.update(fits=False, error=f"out of memory: {(str(error).splitlines() or [''])[0][:160]}")
    emit(record)


def can_cap(device: str) -> bool:
    from portable_kbit import backends

    target = backends.resolve(device)
    return target.backend.can_cap(target.device)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ---- the parent ---------------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, extra: list[str], log: Any) -> list[dict]:
    from portable_kbit.tools import presets

    command = [sys.executable, __file__, "--child", *extra, "--checkpoint", args.checkpoint, "--device", args.device]
    command += ["--quantizer", args.quantizer, "--lora-rank", str(args.lora_rank)]
    done = subprocess.run(
        command, capture_output=True, text=True, env=presets.child_env(), timeout=args.timeout, check=False
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not records:
        tail = done.stderr.strip().splitlines()
        records.append({"kind": "error", "command": extra, "error": f"exit {done.returncode}: {tail[-1:]}"})
    for record in records:
        log(record)
    return records


def measured_fit(probe: Any, start: int, ceiling: int, max_probes: int) -> tuple[int | None, list[int]]:
    """The longest multiple of STEP that runs, searched from `start`: steps of STEP, doubling, then bisection."""
    tried: dict[int, bool] = {}

    def fits(k: int) -> bool:
        if k not in tried:
            tried[k] = probe(k * STEP)
        return tried[k]

    top = ceiling // STEP
    k = min(max(1, start // STEP), top)
    if fits(k):
        lo, hi, jump = k, None, 1
        while hi is None and len(tried) < max_probes:
            nxt = min(top, lo + jump)
            if nxt == lo:
                return lo * STEP, sorted(x * STEP for x in tried)
            if fits(nxt):
                lo, jump = nxt, jump * 2
            else:
                hi = nxt
    else:
        hi, lo, jump = k, None, 1
        while lo is None and len(tried) < max_probes:
            nxt = max(0, hi - jump)
            if nxt == 0:
                return None, sorted(x * STEP for x in tried)
            if fits(nxt):
                lo = nxt
            else:
                hi, jump = nxt, jump * 2
    if lo is None or hi is None:
        return (lo * STEP if lo else None), sorted(x * STEP for x in tried)
    while hi - lo > 1 and len(tried) < max_probes:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo * STEP, sorted(x * STEP for x in tried)


def run_variant(args: argparse.Namespace, variant: str, cap_bytes: int | None, log: Any) -> list[dict]:
    extra = ["measure", "--variant", variant, "--seq-lens", args.seq_lens, "--budget", str(args.budget)]
    if cap_bytes:
        extra += ["--cap-bytes", str(cap_bytes)]
    records = run_child(args, extra, log)
    forecast = next((r for r in records if r["kind"] == "forecast"), None)
    if forecast is None:
        return records
    start = forecast.get("longest_seq_len") or STEP

    def probe(seq_len: int) -> bool:
        extra = ["probe", "--variant", variant, "--seq-len", str(seq_len), "--budget", str(args.budget)]
        extra += ["--probe-steps", str(args.probe_steps)]
        found = run_child(args, extra, log)
        records.extend(found)
        return any(r.get("kind") == "probe" and r.get("fits") for r in found)

    fit, tried = measured_fit(probe, start, forecast["max_seq_len"], args.max_probes)
    measured = {r["seq_len"]: r for r in records if r["kind"] == "measured"}
    errors = {L: r["predicted_bytes"] / r["measured_bytes"] - 1 for L, r in measured.items()}
    predicted_longest = forecast.get("longest_seq_len")
    summary = {
        "kind": "summary",
        "variant": variant,
        "device": forecast["device"],
        "budget_bytes": args.budget,
        "predicted_bytes": {L: r["predicted_bytes"] for L, r in measured.items()},
        "measured_bytes": {L: r["measured_bytes"] for L, r in measured.items()},
        "predicted_error": {L: round(x, 4) for L, x in errors.items()},  # predicted / measured - 1
        "peaks_within_10pct": all(abs(x) <= 0.10 for x in errors.values()),
        "predicted_longest": predicted_longest,
        "measured_longest": fit,
        "probed": tried,
        "longest_within_10pct": (
            None if not fit or not predicted_longest else abs(predicted_longest / fit - 1) <= 0.10
        ),
        "forecast_seconds": forecast["forecast_seconds"],
        "forecast_device_bytes": forecast["forecast_device_bytes"],
        "calibration": forecast.get("calibration"),
        "method": forecast["method"],
    }
    log(summary)
    records.append(summary)
    return records


def parent(args: argparse.Namespace) -> int:
    from portable_kbit import backends
    from portable_kbit.pipeline.prepare import ACTIVATIONS
    from portable_kbit.tools import fit, presets
    from portable_kbit.tools import quantizer_probe as quantizers

    args.budget = fit.parse_bytes(args.budget)
    variants = args.variants.split(",") if args.variants else ["peft", *(f"ours-{m}" for m in ACTIVATIONS)]
    target = backends.resolve(args.device)
    args.device = str(target.device)
    args.quantizer = args.quantizer or quantizers.choose(target.backend.name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    args.checkpoint = presets.materialize(args.preset, device=args.device)
    accelerator = target.backend.can_cap(target.device)
    jobs = args.jobs or (len(variants) if accelerator else 1)
    cap_bytes = None
    if accelerator:  # each process of the measuring phase gets its share of the device
        total = target.backend.fraction_basis(target.device) or 0
        cap_bytes = int(0.9 * total / min(jobs, len(variants))) or None
    print(f"# {args.preset} on {args.device}: {', '.join(variants)}, {jobs} at a time", file=sys.stderr)
    lines = open(out / "forecast_accuracy.jsonl", "w")

    def log(record: dict) -> None:
        record = {**record, "preset": args.preset, "elapsed": round(time.perf_counter() - started, 1)}
        lines.write(json.dumps(record) + "\n")
        lines.flush()
        print(json.dumps(record)[:300], file=sys.stderr, flush=True)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda v: run_variant(args, v, cap_bytes, log), variants))
    finally:
        lines.close()
    summaries = [r for records in results for r in records if r.get("kind") == "summary"]
    print(table(summaries))
    everything = [r for records in results for r in records]
    try:
        print(f"plot: {plot(everything, str(out / 'forecast_accuracy.png'))}", file=sys.stderr)
    except ImportError as error:
        print(f"# no plot: {error}", file=sys.stderr)
    print(f"# done in {time.perf_counter() - started:.0f} s; {out / 'forecast_accuracy.jsonl'}", file=sys.stderr)
    return 0 if len(summaries) == len(variants) else 1


def plot(records: list[dict], path: str) -> str:
    """Predicted peak against length per variant, the budget line, measured peaks (x) and failed probes; one colour
    per variant in a fixed order (peft first), whatever order the variants finished in."""
    from portable_kbit.tools import fit

    order = sorted({r["variant"] for r in records if "variant" in r}, key=lambda v: (v != "peft", v))
    shown = []
    for record in sorted(records, key=lambda r: order.index(r["variant"]) if r.get("variant") in order else -1):
        if record.get("kind") == "forecast":
            shown.append({**record, "mode": record["variant"]})
        elif record.get("kind") in ("measured", "probe"):
            shown.append({**record, "kind": "verify", "mode": record["variant"]})
    return fit.plot(shown, path)


def table(summaries: list[dict]) -> str:
    if not summaries:
        return "(no variant finished)"
    lengths = sorted({int(L) for s in summaries for L in s["predicted_bytes"]})
    head = ["variant", *(f"{L}: predicted / measured MiB" for L in lengths), "longest: predicted / measured"]
    head += ["forecast s", "forecast device MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        row = [s["variant"]]
        for L in lengths:
            p, m = s["predicted_bytes"].get(L), s["measured_bytes"].get(L)
            row.append("" if p is None or m is None else f"{p / 2**20:.0f} / {m / 2**20:.0f} ({p / m - 1:+.1%})")
        row.append(f"{s['predicted_longest']} / {s['measured_longest']}")
        row.append(f"{s['forecast_seconds']:.1f}")
        device = s["forecast_device_bytes"]
        row.append("" if device is None else f"{device / 2**20:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="tiny, small or mistral-7b (or a local checkpoint folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantizer", default=None, help="default: bnb-nf4 where bitsandbytes works")
    parser.add_argument("--variants", default=None, help="default: peft and ours-<mode> for every activations mode")
    parser.add_argument("--seq-lens", default="512,1024,2048")
    parser.add_argument("--budget", default="8GiB")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=None, help="variants at a time (default: all on a GPU, 1 on CPU)")
    parser.add_argument("--max-probes", type=int, default=6, help="fresh processes per variant for the measured fit")
    parser.add_argument(
        "--probe-steps",
        type=int,
        default=1,
        help="training steps per probe (default 1, as in run 4; a longer run fragments the allocator's cache more: "
        "issue 8's five-step fits stopped shorter)",
    )
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default="benchmarks/results/forecast")
    # a child process
    parser.add_argument("--child", choices=("measure", "probe"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cap-bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None:
        return parent(args)
    import warnings

    warnings.simplefilter("ignore")
    args.budget = int(args.budget)
    if args.child == "measure":
        child_measure(args)
    else:
        child_probe(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
