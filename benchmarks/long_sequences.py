"""Long sequences: the longest sequence that trains under an 8 GiB cap, and the step time at 512 and 4096 tokens, with
and without token blocks (prepare(token_blocks=...)), for each activations mode; side by side with peft and with
Liger's fused linear cross entropy (where liger-kernel is importable, on CUDA).

    python benchmarks/long_sequences.py --preset mistral-7b --out benchmarks/results/h100 --jobs 8      # GPU
    python benchmarks/long_sequences.py --preset tiny --device cpu --out /tmp/long --fit-stop 768      # CPU check

The workload is the Mistral-7B one of portable_kbit.compare: a random-weight checkpoint of the preset's shape
(built once, no download), bitsandbytes nf4 with double quant (compute bf16), LoRA r=16 on q,k,v,o, non-reentrant
gradient checkpointing, AdamW lr 1e-4, 5 steps on one random sequence.

- fit (long_fit.jsonl): for each variant, one fresh process per length, in steps of 256 (with --coarse C: first in
  steps of C, then in steps of 256 between the last length that fitted and the first that did not). A length counts
  when it and every shorter length tested fits: the search of a variant stops at its first failure. On CUDA each
  process caps its allocator at --cap-gib (8 GiB: torch.cuda.set_per_process_memory_fraction, through
  portable_kbit.tools.compare.cap_memory); --jobs runs that many processes at once (several 8 GiB processes fit on one
  80 GB GPU; each also holds a CUDA context of a few hundred MiB outside its cap). On a CPU there is no cap.
- time (long_time.jsonl): one process per variant, uncapped, not concurrent; for each of --time-lengths the same
  starting adapter weights, --steps steps (5), each timed with a device synchronisation; the median of all but the
  first, and the loss of every step.

long_sequences.md is the table of both files (the latest record of each variant): --measure fit and --measure time,
or groups of --variants with --append, can run as separate commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

GiB = 1 << 30
MiB = 1 << 20
CHECKPOINTING = {"use_reentrant": False}


@dataclasses.dataclass(frozen=True)
class Variant:
    prep: str  # "peft" or "ours"
    activations: str = "fp32"
    token_blocks: str | int | None = None
    liger: bool = False
    offload: bool = False  # prepare(offload_checkpoints=True): checkpointed layer inputs in host memory
    ablation: str | None = None  # mixed with one half only (portable_kbit.tools.compare.mixed_ablation)
    mlp_rule: str | None = None  # the backend's mlp_block_rule for this process ("hidden": TiledMLP's block size)
    tf32: bool = False  # prepare(tf32=True): fp32 matmuls on TF32 tensor cores


def _variants() -> dict[str, Variant]:
    """peft, and each activations mode alone, with token blocks, with offloaded checkpoints, with both; fp32 and
    native also with Liger's fused linear cross entropy."""
    variants = {"peft": Variant("peft")}
    for mode in ("fp32", "mixed", "native", "layer"):
        variants[mode] = Variant("ours", mode)
        variants[f"{mode}+blocks"] = Variant("ours", mode, "auto")
        variants[f"{mode}+offload"] = Variant("ours", mode, offload=True)
        variants[f"{mode}+blocks+offload"] = Variant("ours", mode, "auto", offload=True)
        if mode in ("fp32", "native"):
            variants[f"{mode}+liger"] = Variant("ours", mode, liger=True)
        for tail, offload in (("+blocks+tiledmlp", False), ("+blocks+offload+tiledmlp", True)):
            # the MLPs in blocks of about the hidden width (Backend.mlp_block_rule = "hidden"), the head's unchanged
            variants[mode + tail] = Variant("ours", mode, "auto", offload=offload, mlp_rule="hidden")
        variants[f"{mode}+tf32"] = Variant("ours", mode, tf32=True)
        variants[f"{mode}+blocks+tf32"] = Variant("ours", mode, "auto", tf32=True)
    for part in ("attention", "mlp"):  # the ablations of mixed: which half costs what
        variants[f"mixed-{part}"] = Variant("ours", "mixed", ablation=part)
    return variants


VARIANTS = _variants()
#: --lora: where the adapters go and their rank. "qkvo-r16": the compare workload's; "all-r32": every linear layer of
#: the decoder layers at rank 32, the setting of unsloth's published context-length table
LORA = {
    "qkvo-r16": (None, 16),
    "all-r32": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 32),
}
DEFAULT_VARIANTS = "peft,fp32,fp32+blocks,fp32+liger,layer,layer+blocks,native,native+blocks,native+liger"
#: --expandable: the children's allocator setting, and the suffix their records' variant names get
EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


# ---- one process: load, prepare, train ---------------------------------------------------------------------------


def liger_available() -> str | None:
    """None if Liger's fused linear cross entropy can run here, else why not."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
        from liger_kernel.transformers import monkey_patch  # noqa: F401
    except ImportError as error:
        return f"liger-kernel not importable ({error})"
    return None


def load_prepared(checkpoint: str, variant: str, device: str, lora: str = "qkvo-r16") -> tuple[Any, Any, dict]:
    """Load the checkpoint through bitsandbytes nf4, prepare it as the variant says, attach LoRA as `lora` says."""
    from peft import LoraConfig, get_peft_model

    from portable_kbit import backends, prepare, report
    from portable_kbit.tools import compare, tiny
    from portable_kbit.tools.mixed_ablation import mixed_ablation

    spec = VARIANTS[variant]
    target = backends.resolve(device)
    names, rank = LORA[lora]
    targets = names or compare.lora_targets(checkpoint)
    model = tiny.load(checkpoint, "bnb-nf4", str(target.device))
    info: dict[str, Any] = {}
    if spec.prep == "peft":
        model = compare.prepare_variant(model, "peft", target, targets, info)
    else:
        rule = spec.mlp_rule or target.backend.mlp_block_rule
        with mixed_ablation(spec.ablation), mock.patch.object(target.backend, "mlp_block_rule", rule):
            model = prepare(
                model,
                str(target.device),
                target_modules=targets,
                activations=spec.activations,
                token_blocks=spec.token_blocks,
                offload_checkpoints=spec.offload,
                tf32=spec.tf32,
                gradient_checkpointing_kwargs=CHECKPOINTING,
            )
        done = report(model)
        if done is not None:
            info["offload"] = done.offload_reason
            info["tf32"] = done.tf32_reason
            info["token_blocks"] = done.token_blocks
            info["mlp_token_blocks"] = done.mlp_token_blocks
            info["blocked_head"] = done.blocked_head
            info["blocked_mlps"] = len(done.blocked_mlps)
            info["not_blocked"] = done.not_blocked
    if spec.liger:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        # only the fused linear cross entropy: the head and the loss, nothing else of Liger's
        _apply_liger_kernel_to_instance(
            model=model, fused_linear_cross_entropy=True, cross_entropy=False, rope=False, rms_norm=False, swiglu=False
        )
    import torch

    torch.manual_seed(0)  # the same LoRA A initialisation in every process: losses comparable step by step
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(model, config)
    return model, target, info


def train(model: Any, target: Any, steps: int, seq_len: int, lr: float = 1e-4) -> tuple[list[float], list[float]]:
    """`steps` AdamW steps on one random sequence (portable_kbit.compare's); the losses and each step's seconds."""
    import torch

    from portable_kbit.tools import tiny

    model.train()
    embeddings = model.get_input_embeddings().weight
    ids = tiny.batch(embeddings.shape[0], seq_len, seed=1, device=str(embeddings.device))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, seconds = [], []
    for _ in range(steps):
        target.backend.synchronize(target.device)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        target.backend.synchronize(target.device)
        seconds.append(time.perf_counter() - started)
    return losses, seconds


def _peaks(target: Any) -> dict[str, int | None]:
    stats = target.backend.allocator_stats(target.device)
    return {"peak_allocated": stats.peak_allocated, "peak_reserved": stats.peak_reserved}


def _out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _offloaded(model: Any) -> dict | None:
    """What prepare(offload_checkpoints=True) sent to the host while training (None: not on)."""
    from portable_kbit import report

    done = report(model)
    return done.offload.to_dict() if done is not None and done.offload is not None else None


def _cap(target: Any, cap_bytes: int) -> int | None:
    """Cap this process's allocator at `cap_bytes` where the target's device is CUDA; the cap in MiB, or None."""
    import torch

    from portable_kbit.tools import compare

    if target.device.type != "cuda":
        return None
    compare.cap_memory(target, cap_bytes / torch.cuda.get_device_properties(target.device).total_memory)
    return cap_bytes // MiB


def child_fit(
    checkpoint: str, variant: str, device: str, seq_len: int, steps: int, cap_bytes: int, lora: str = "qkvo-r16"
) -> dict:
    """In this process: cap the allocator (CUDA), load, prepare, train `steps` steps at `seq_len`; the record."""
    record: dict[str, Any] = {"variant": variant, "seq_len": seq_len, "steps": steps, "device": device, "lora": lora}
    from portable_kbit import backends

    target = backends.resolve(device)  # resolved before loading: the peaks are read even where loading runs out
    cap_mib = _cap(target, cap_bytes)
    if cap_mib is not None:
        record["cap_mib"] = cap_mib
    try:
        model, target, info = load_prepared(checkpoint, variant, device, lora)
        record.update(info)
        target.backend.reset_peak(target.device)
        record["losses"], record["seconds"] = train(model, target, steps, seq_len)
        record["fits"] = True
        record["offloaded"] = _offloaded(model)
    except Exception as error:
        record["fits"] = False
        if _out_of_memory(error):  # the request that failed: fragmentation or a real shortfall
            record["oom"] = (str(error).strip().splitlines() or [""])[0][:300]
        else:
            record["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
    record.update(_peaks(target))
    return record


def child_time(
    checkpoint: str,
    variant: str,
    device: str,
    lengths: list[int],
    steps: int,
    lora: str = "qkvo-r16",
    cap_bytes: int | None = None,
) -> list[dict]:
    """In this process, uncapped unless `cap_bytes` says (CUDA): the step time and losses at each length, from the
    same starting adapter."""
    records = []
    from portable_kbit import backends

    cap_mib = _cap(backends.resolve(device), cap_bytes) if cap_bytes else None
    try:
        model, target, info = load_prepared(checkpoint, variant, device, lora)
    except Exception as error:
        return [{"variant": variant, "phase": "time", "error": f"{type(error).__name__}: {str(error)[:300]}"}]
    # on the host: device copies of the adapters (~320 MiB for all-r32 on an 8B model) would count against a cap that
    # the fit probes do not pay (run 10: 12,288 tokens fitted without offload, and its timed run ran out)
    start = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    for seq_len in lengths:
        with_grad = dict(model.named_parameters())
        for name, value in start.items():
            with_grad[name].data.copy_(value)
        record: dict[str, Any] = {
            "variant": variant,
            "phase": "time",
            "seq_len": seq_len,
            "steps": steps,
            "lora": lora,
            **info,
        }
        if cap_mib is not None:
            record["cap_mib"] = cap_mib
        target.backend.reset_peak(target.device)
        try:
            record["losses"], record["seconds"] = train(model, target, steps, seq_len)
            record["step_seconds"] = statistics.median(record["seconds"][1:] or record["seconds"])
            record["offloaded"] = _offloaded(model)
        except Exception as error:
            record["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
        record.update(_peaks(target))
        records.append(record)
    return records


# ---- the parent: processes, the fit search --------------------------------------------------------------------------


def _child_command(args: argparse.Namespace, checkpoint: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--checkpoint",
        checkpoint,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--lora",
        args.lora,
        *extra,
    ]


def _env(expandable: bool = False) -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}
    return {**env, **EXPANDABLE} if expandable else env


def child_records(command: list[str], failed: dict, env: dict[str, str] | None = None) -> list[dict]:
    """Run a child process to its end: the JSON records it printed, or `failed` with the end of its stderr as the
    error where it printed none."""
    done = subprocess.run(command, capture_output=True, text=True, env=env or _env())
    return _records(done.stdout) or [{**failed, "error": done.stderr.strip()[-300:]}]


def _records(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


class FitSearch:
    """The ascending search of one variant: lengths tested in order, stopped at the first that does not fit."""

    def __init__(self, variant: str, start: int, stop: int, coarse: int, lengths: list[int] | None = None) -> None:
        self.variant, self.start, self.stop, self.coarse = variant, start, stop, coarse
        step = coarse if coarse else 256
        # `lengths`: these alone, in order (a probe of given lengths, no refinement)
        self.queue = sorted(lengths) if lengths else list(range(start, stop + 1, step))
        self.results: dict[int, dict] = {}
        self.refined = not coarse or bool(lengths)

    def first_failure(self) -> int | None:
        failed = [n for n, r in self.results.items() if not r.get("fits")]
        return min(failed) if failed else None

    def next_length(self, running: set[int]) -> int | None:
        failure = self.first_failure()
        while self.queue and failure is not None and self.queue[0] > failure:
            self.queue.clear()
        if not self.queue and not self.refined and not running:
            self.refined = True
            fitted = [n for n, r in self.results.items() if r.get("fits") and (failure is None or n < failure)]
            low = max(fitted) if fitted else self.start - 256
            high = failure if failure is not None else self.stop + 1
            self.queue = [n for n in range(low + 256, high, 256) if n not in self.results and n >= self.start]
        return self.queue.pop(0) if self.queue else None

    def cancelled(self, seq_len: int) -> bool:
        failure = self.first_failure()
        return failure is not None and seq_len > failure

    def longest(self) -> int | None:
        """The longest tested length such that it and every shorter tested length fit."""
        best = None
        for seq_len in sorted(self.results):
            if not self.results[seq_len].get("fits"):
                break
            best = seq_len
        return best


def run_fits(
    args: argparse.Namespace, checkpoint: str, variants: list[str], emit: Callable[[dict], None], log
) -> dict[str, dict]:
    searches = {v: FitSearch(v, args.fit_start, args.fit_stop, args.coarse, args.fit_lengths) for v in variants}
    running: dict[subprocess.Popen, tuple[str, int]] = {}
    order = list(variants)
    while True:
        launched = False
        for variant in order:
            if len(running) >= args.jobs:
                break
            busy = {n for v, n in running.values() if v == variant}
            seq_len = searches[variant].next_length(busy)
            if seq_len is None:
                continue
            command = _child_command(
                args, checkpoint, "--child", "fit", "--variant", variant, "--seq-len", str(seq_len)
            )
            command += ["--cap-bytes", str(int(args.cap_gib * GiB))]
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(args.expandable)
            )
            running[process] = (variant, seq_len)
            launched = True
        if not running and not launched:
            break
        time.sleep(0.5)
        for process in list(running):
            variant, seq_len = running[process]
            if searches[variant].cancelled(seq_len) and process.poll() is None:
                process.kill()  # longer than a length that failed: its result cannot count
            if process.poll() is None:
                continue
            stdout, stderr = process.communicate()
            del running[process]
            if searches[variant].cancelled(seq_len):
                continue
            found = _records(stdout)
            record = found[-1] if found else {"variant": variant, "seq_len": seq_len, "fits": False}
            if not found:
                record["error"] = f"exit status {process.returncode}: {stderr.strip()[-300:]}"
            searches[variant].results[seq_len] = record
            emit({"phase": "fit-length", **record})
            verdict = "fits" if record.get("fits") else "does not fit"
            log(f"fit {variant} {seq_len}: {verdict} {record.get('error', '')}")
    summary = {}
    for variant, search in searches.items():
        errors = [r["error"] for r in search.results.values() if r.get("error")]
        summary[variant] = {
            "phase": "fit",
            "variant": variant,
            "longest": search.longest(),
            "first_failure": search.first_failure(),
            "tested": sorted(search.results),
            "cap_mib": int(args.cap_gib * GiB) // MiB,
            "lora": args.lora,
            "error": errors[0] if errors else None,
        }
        emit(summary[variant])
    return summary


def run_times(
    args: argparse.Namespace, checkpoint: str, variants: list[str], emit: Callable[[dict], None], log
) -> list[dict]:
    lengths = ",".join(str(n) for n in args.time_lengths)
    out = []
    for variant in variants:
        command = _child_command(args, checkpoint, "--child", "time", "--variant", variant, "--seq-lens", lengths)
        if args.cap_times:
            command += ["--cap-bytes", str(int(args.cap_gib * GiB))]
        found = child_records(command, {"variant": variant, "phase": "time"}, _env(args.expandable))
        for record in found:
            emit(record)
            log(f"time {variant} {record.get('seq_len')}: {record.get('step_seconds')} s {record.get('error', '')}")
        out += found
    return out


def table(fits: dict[str, dict], times: list[dict]) -> str:
    """Markdown: per variant, the longest length under the cap, and the step time and last loss per length."""
    lengths = sorted({r["seq_len"] for r in times if "seq_len" in r})
    by = {(r["variant"], r.get("seq_len")): r for r in times}
    peft_fit = (fits.get("peft") or {}).get("longest")
    head = ["variant", "longest under the cap"] + [f"step s at {n}" for n in lengths] + ["notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in dict.fromkeys([*fits, *(r["variant"] for r in times)]):
        fit = fits.get(variant, {})
        longest = fit.get("longest")
        cell = "" if not fit else str(longest) if longest else f"< {fit.get('first_failure')}"
        if longest and peft_fit:
            cell += f" ({longest / peft_fit:.2f}x peft)"
        row = [variant, cell]
        base = variant.split("+")[0]
        for n in lengths:
            record = by.get((variant, n), {})
            seconds = record.get("step_seconds")
            reference = by.get((base, n), {}).get("step_seconds")
            text = "" if seconds is None else f"{seconds:.3f}"
            if seconds and reference and base != variant:
                text += f" ({seconds / reference:.2f}x)"
            row.append(text)
        # a time run that failed before its first length has no length: its error is the variant's
        notes = [fit.get("error") or "", by.get((variant, None), {}).get("error") or ""]
        notes += [by.get((variant, n), {}).get("error") or "" for n in lengths]
        row.append("; ".join(n for n in notes if n)[:200])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def loss_gaps(times: list[dict]) -> dict[str, float]:
    """Per blocked/liger variant and length: the largest gap between its losses and its mode's without blocks."""
    by = {(r["variant"], r.get("seq_len")): r for r in times if "losses" in r}
    gaps = {}
    for (variant, seq_len), record in by.items():
        base = variant.split("+")[0]
        reference = by.get((base, seq_len))
        if base != variant and reference is not None:
            pairs = zip(record["losses"], reference["losses"], strict=False)
            gaps[f"{variant}@{seq_len}"] = max(abs(a - b) for a, b in pairs)
    return gaps


def _read(path: Path) -> list[dict]:
    return _records(path.read_text())


def run(args: argparse.Namespace) -> int:
    from portable_kbit.tools import compare

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"# {message} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    why_not = liger_available()
    if why_not is not None:
        skipped = [v for v in variants if VARIANTS[v].liger]
        variants = [v for v in variants if not VARIANTS[v].liger]
        if skipped:
            log(f"skipping {', '.join(skipped)}: {why_not}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = compare.materialize(args.preset, device=args.device)
    log(f"checkpoint ready: {checkpoint}")
    versions = compare.versions()
    fits: dict[str, dict] = {}
    times: list[dict] = []
    mode = "a" if args.append else "w"
    if "fit" in args.measure:
        with open(out / "long_fit.jsonl", mode) as sink:

            def emit_fit(record: dict) -> None:
                if args.expandable and "variant" in record:  # a record of its own in the table
                    record = {**record, "variant": record["variant"] + "@expandable", "allocator": EXPANDABLE}
                sink.write(json.dumps({**record, "preset": args.preset, "versions": versions}) + "\n")
                sink.flush()

            fits = run_fits(args, checkpoint, variants, emit_fit, log)
    if "time" in args.measure:
        with open(out / "long_time.jsonl", mode) as sink:

            def emit_time(record: dict) -> None:
                sink.write(json.dumps({**record, "preset": args.preset, "versions": versions}) + "\n")
                sink.flush()

            times = run_times(args, checkpoint, variants, emit_time, log)
    # the table is made from the files: runs of one measure, or of some variants (--append), add up
    if (out / "long_fit.jsonl").exists():
        fits = {r["variant"]: r for r in _read(out / "long_fit.jsonl") if r.get("phase") == "fit"}
    if (out / "long_time.jsonl").exists():
        latest = {
            (r["variant"], r.get("seq_len")): r for r in _read(out / "long_time.jsonl") if r.get("phase") == "time"
        }
        times = list(latest.values())
    text = table(fits, times)
    gaps = loss_gaps(times)
    if gaps:
        text += "\n\nLargest loss gap to the same mode without blocks, per step: " + ", ".join(
            f"{k} {v:.2e}" for k, v in gaps.items()
        )
    (out / "long_sequences.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="mistral-7b", help="a portable_kbit.compare preset (mistral-7b, small, tiny)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/run")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--measure", default="fit,time", help="fit, time or both")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cap-gib", type=float, default=8.0, help="allocator cap per fit process (CUDA)")
    parser.add_argument(
        "--cap-times", action="store_true", help="time processes run under the same cap (CUDA; default uncapped)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="fit processes at once (each capped; CUDA)")
    parser.add_argument("--fit-start", type=int, default=1024)
    parser.add_argument("--fit-stop", type=int, default=8192)
    parser.add_argument("--coarse", type=int, default=0, help="first search in steps of this (a multiple of 256)")
    parser.add_argument(
        "--fit-lengths",
        type=lambda s: [int(x) for x in s.split(",")],
        help="test these lengths alone (comma-separated), in order, instead of the search",
    )
    parser.add_argument("--lora", choices=sorted(LORA), default="qkvo-r16", help="adapter targets and rank")
    parser.add_argument("--append", action="store_true", help="add to the result files instead of replacing them")
    parser.add_argument(
        "--expandable",
        action="store_true",
        help="children run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; their fit records are named "
        "VARIANT@expandable",
    )
    parser.add_argument("--time-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[512, 4096])
    parser.add_argument("--child", choices=["fit", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq-lens", help=argparse.SUPPRESS)
    parser.add_argument("--cap-bytes", type=int, help=argparse.SUPPRESS)  # a fit child's is always given
    args = parser.parse_args(argv)
    if args.coarse % 256:
        parser.error("--coarse must be a multiple of 256")
    if args.child == "fit":
        warnings.simplefilter("ignore")  # one JSON line on stdout is the result; warnings go to stderr anyway
        print(
            json.dumps(
                child_fit(
                    args.checkpoint, args.variant, args.device, args.seq_len, args.steps, args.cap_bytes, args.lora
                )
            )
        )
        return 0
    if args.child == "time":
        lengths = [int(x) for x in args.seq_lens.split(",")]
        for record in child_time(
            args.checkpoint, args.variant, args.device, lengths, args.steps, args.lora, args.cap_bytes
        ):
            print(json.dumps(record), flush=True)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
