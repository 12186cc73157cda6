"""QLoRA sharded with FSDP over N processes: peft's preparation and portable_kbit's, memory per rank, losses against
one unsharded process (docs/multi-gpu.md).

    python -m portable_kbit compare small --build-preset      # once, before launching (mistral-7b: --device cuda)
    python benchmarks/fsdp_qlora.py --single --preset small --steps 3 --seq-len 128 --out benchmarks/results/cpu/fsdp
    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_qlora.py --preset small --steps 3 --seq-len 128 \
        --out benchmarks/results/cpu/fsdp
    python benchmarks/fsdp_qlora.py --table --out benchmarks/results/cpu/fsdp

Each process loads the preset's random-weight checkpoint (portable_kbit.compare's presets: "small" on a CPU,
"mistral-7b" on GPUs; rank 0 builds a missing one, the others wait for it) through bitsandbytes nf4 with double
quantization, compute dtype bf16, and the packed 4-bit weights in bf16 storage (bnb_4bit_quant_storage: FSDP can
shard them); prepares it (peft's prepare_model_for_kbit_training, or portable_kbit.prepare with activations "fp32" or
"native"); attaches LoRA r=16 (alpha 32) on q/k/v/o; shards it (FSDP2: fully_shard on each decoder layer, then the
root, with a bf16 MixedPrecisionPolicy and cast_forward_inputs=False, or no policy with --mp none; FSDP1:
FullyShardedDataParallel with peft's fsdp_auto_wrap_policy, use_orig_params=True, no mixed precision); then trains
--steps AdamW steps (lr 1e-4), non-reentrant gradient checkpointing, on one random sequence, the same on every rank
(so the sharded losses are those of one process, up to what the bf16 policy changes). Process group: nccl on GPUs
(one per process, LOCAL_RANK), gloo on the CPU.

Per rank and case, one JSON line in <out>/sharded-n<N>.jsonl: each phase (load, prep, lora, shard, train) with its
seconds, the memory after it (allocated / reserved on a GPU; process RSS everywhere) and its peak (the allocator's,
or RSS polled after each backward on a CPU); the losses; the 4-bit check: a fingerprint of each packed weight as
loaded against the weight each layer computes with in its first forward after sharding (NaN canonicalization of
bf16-packed NF4 bytes, bitsandbytes issue 1945, shows as changed layers); a failure as a result ("error": phase,
type, message), not a crash. --single runs the same variants in one process, unsharded (<out>/single.jsonl);
--table writes <out>/table.md, each case's losses against the single run of its variant. A run of some --cases
replaces those cases' lines and keeps the others.

On a CPU the RSS of one case carries over into the next in the same process (freed memory is not always returned to
the OS): run one case per launch (--cases) for clean CPU numbers. GPU numbers are the allocator's, reset per case.
The committed CPU run (benchmarks/results/cpu/fsdp/, 2 cores, about 2.5 minutes) was:

    python -m portable_kbit compare small --build-preset
    ARGS="--preset small --steps 3 --seq-len 128 --out benchmarks/results/cpu/fsdp"
    for case in peft:fsdp2 ours-fp32:fsdp2 ours-native:fsdp2; do
        python benchmarks/fsdp_qlora.py --single --cases $case $ARGS; done
    for case in peft:fsdp2 peft:fsdp1 ours-fp32:fsdp2 ours-native:fsdp2 ours-fp32:fsdp1; do
        torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_qlora.py --cases $case $ARGS; done
    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_qlora.py --cases ours-fp32:fsdp2 --mp none $ARGS
    python benchmarks/fsdp_qlora.py --table --out benchmarks/results/cpu/fsdp
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

VARIANTS = ("peft", "ours-fp32", "ours-native")
WRAPS = ("fsdp2", "fsdp1")
CASES = ("peft:fsdp2", "peft:fsdp1", "ours-fp32:fsdp2", "ours-native:fsdp2", "ours-fp32:fsdp1")
MiB = 1 << 20


# ---- where this process runs --------------------------------------------------------------------------------------


class World:
    """This process's rank, device and the collectives the run needs (a world of one without torchrun)."""

    def __init__(self, device: str, distributed: bool) -> None:
        self.distributed = distributed
        self.rank = int(os.environ.get("RANK", 0)) if distributed else 0
        self.size = int(os.environ.get("WORLD_SIZE", 1)) if distributed else 1
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{local}") if device == "cuda" else torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        self._mesh: Any = None

    @property
    def mesh(self) -> Any:
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.size,))
        return self._mesh

    def any_failed(self, failed: bool) -> bool:
        """True on every rank when any rank failed: all stop the case together instead of waiting in a collective."""
        if not self.distributed:
            return failed
        flag = torch.tensor([1.0 if failed else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def gather(self, record: dict) -> list[dict]:
        if not self.distributed:
            return [record]
        out: list[Any] = [None] * self.size if self.rank == 0 else []
        dist.gather_object(record, out if self.rank == 0 else None, dst=0)
        return out

    def wait_for_checkpoint(self, preset: str, cache_dir: str | None) -> str:
        """Rank 0 builds the preset once (a no-op when it exists); the others wait for its folder."""
        from portable_kbit.tools import compare

        if self.rank == 0:
            path = compare.materialize(preset, cache_dir, str(self.device) if self.device.type == "cuda" else None)
        else:
            path = compare.preset_path(preset, cache_dir) if not os.path.isdir(preset) else preset
            deadline = time.monotonic() + 3600
            while not os.path.isfile(os.path.join(path, "config.json")):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {self.rank}: no checkpoint at {path} after an hour")
                time.sleep(2)
        if self.distributed:
            dist.barrier()
        return path

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


# ---- measurement ----------------------------------------------------------------------------------------------------


class Phases:
    """Runs the phases of one case; memory after each and its peak; stops at the first failure (on any rank)."""

    def __init__(self, world: World) -> None:
        from portable_kbit import backends
        from portable_kbit.memory import snapshots as memory

        self.world = world
        self.target = backends.resolve(str(world.device))
        self.records: dict[str, dict] = {}
        self.error: dict | None = None
        start = memory.take(self.target)  # what the process holds before the case (imports, earlier cases)
        self.start = {"allocated": start.allocated, "reserved": start.reserved, "process_rss": start.process_rss}

    def run(self, name: str, step: Callable[[list], Any]) -> Any:
        from portable_kbit.memory import snapshots as memory

        if self.error is not None:
            return None
        backend, device = self.target.backend, self.target.device
        backend.synchronize(device)
        backend.reset_peak(device)
        before = memory.take(self.target)
        samples: list = []
        started = time.perf_counter()
        result, failure = None, None
        try:
            result = step(samples)
            backend.synchronize(device)
        except Exception as error:  # a failure is a result of this benchmark
            first = (str(error).strip().splitlines() or [""])[0]
            failure = {"phase": name, "type": type(error).__name__, "message": first[:400]}
            traceback.print_exc(file=sys.stderr)
        seconds = time.perf_counter() - started
        after = memory.take(self.target)
        peak = memory.peak_of(before, [*samples, after])
        self.records[name] = {
            "seconds": round(seconds, 4),
            "allocated": after.allocated,
            "reserved": after.reserved,
            "peak_allocated": peak.allocated,
            "peak_reserved": peak.reserved,
            "process_rss": after.process_rss,
            "peak_process_rss": peak.process_rss,
        }
        if self.world.any_failed(failure is not None) and self.error is None:
            self.error = failure or {"phase": name, "type": "Stopped", "message": "another rank failed"}
        return result


def fingerprint(tensor: torch.Tensor, block: int = 1 << 20) -> list[int]:
    """Of a packed 4-bit weight's bits: their sum, a position-weighted sum, and the NaN patterns in its bf16 view.
    Any change of a value (NaN canonicalization included) changes the sums. In blocks, so that the check adds a few
    MiB at most to the memory it runs beside (the first training step)."""
    flat = tensor.detach().reshape(-1)
    total, weighted, nans = 0, 0, 0
    for start in range(0, flat.numel(), block):
        part = flat[start : start + block]
        bits = part.view(torch.int16).to(torch.int64)
        weights = torch.arange(start, start + part.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        total += int(bits.sum())
        weighted += int((bits * weights).sum())
        if part.element_size() == 2:
            nans += int(torch.isnan(part.view(torch.bfloat16)).sum())
    return [total, weighted, nans]


class PackedCheck:
    """The packed 4-bit weights as loaded, and as each layer sees them in its first forward (after sharding)."""

    def __init__(self, model: torch.nn.Module) -> None:
        import bitsandbytes as bnb

        self.loaded: dict[str, list[int]] = {}
        self.seen: dict[str, list[int]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                self.loaded[name] = fingerprint(module.weight)
                self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if name not in self.seen:  # recomputation under gradient checkpointing sees the same weight again
                self.seen[name] = fingerprint(module.weight)

        return hook

    def result(self) -> dict:
        for handle in self.handles:
            handle.remove()
        changed = sorted(name for name, seen in self.seen.items() if seen != self.loaded[name])
        return {
            "layers": len(self.loaded),
            "seen_in_forward": len(self.seen),
            "changed": len(changed),
            "changed_examples": changed[:5],
            "nan_patterns_loaded": sum(f[2] for f in self.loaded.values()),
            "nan_patterns_seen": sum(f[2] for f in self.seen.values()),
            "unchanged": not changed and len(self.seen) == len(self.loaded),
        }


# ---- one case -----------------------------------------------------------------------------------------------------


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    return list(model.base_model.model.model.layers)  # PeftModel -> LoraModel -> *ForCausalLM -> model.layers


def shard(model: Any, wrap: str, world: World, mp: str) -> Any:
    if wrap == "fsdp1":
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        # peft's policy: each decoder layer, and each trainable leaf (LoRA) in a unit of its own
        return FullyShardedDataParallel(
            model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True, device_id=world.device
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # param_dtype: None or the quant storage dtype (bf16); cast_forward_inputs=False keeps an fp32 stream of
    # activations between layers (True would round it to bf16 at each layer's input)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, cast_forward_inputs=False)
        if mp == "bf16"
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=world.mesh, mp_policy=policy)
    fully_shard(model, mesh=world.mesh, mp_policy=policy)
    return model


def run_case(args: argparse.Namespace, world: World, checkpoint: str, variant: str, wrap: str) -> dict:
    """Load, prepare, LoRA, shard (unless wrap is "none"), train; the record of this rank."""
    from peft import LoraConfig, get_peft_model

    from portable_kbit.memory import snapshots as memory
    from portable_kbit.tools import compare, tiny

    phases = Phases(world)
    target = phases.target
    targets = compare.lora_targets(checkpoint)
    state: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    def load(samples: list) -> None:
        state["model"] = tiny.load(checkpoint, "bnb-nf4", str(world.device), quant_storage=torch.bfloat16)
        gc.collect()  # the loader leaves a collection due: not the next phase's to pay

    def prep(samples: list) -> None:
        model = compare.prepare_variant(state["model"], variant, target, targets, extra)
        extra["fp32_frozen_parameters"] = sum(
            1 for p in model.parameters() if p.dtype == torch.float32 and not p.requires_grad
        )
        state["model"] = model

    def lora(samples: list) -> None:
        torch.manual_seed(0)  # the same adapters on every rank and in the single run
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, lora_dropout=0.0)
        model = get_peft_model(state["model"], config)
        extra["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        extra["trainable_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
        state["ids"] = tiny.batch(model.get_input_embeddings().weight.shape[0], args.seq_len, 1, str(world.device))
        state["check"] = PackedCheck(model)
        state["model"] = model

    def wrap_model(samples: list) -> None:
        state["model"] = shard(state["model"], wrap, world, args.mp)

    def train(samples: list) -> None:
        model, ids = state["model"], state["ids"]
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        state["optimizer"] = optimizer
        state["losses"] = losses = []
        for _ in range(args.steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            samples.append(memory.take(target))  # gradients alive: the polled peak where no allocator keeps one
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))

    phases.run("load", load)
    phases.run("prep", prep)
    phases.run("lora", lora)
    if wrap != "none":
        phases.run("shard", wrap_model)
    phases.run("train", train)
    check = state.get("check")
    record = {
        "variant": variant,
        "wrap": wrap,
        "mp": args.mp if wrap == "fsdp2" else None,
        "rank": world.rank,
        "world_size": world.size,
        "device": str(world.device),
        "device_name": torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu",
        "checkpoint": os.path.basename(checkpoint.rstrip(os.sep)),
        "preset": args.preset,
        "steps": args.steps,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "r": args.r,
        "threads": torch.get_num_threads(),
        "start": phases.start,
        "phases": phases.records,
        "losses": state.get("losses", []),
        "packed_check": check.result() if check is not None else None,
        "error": phases.error,
        **extra,
        "versions": compare.versions(),
    }
    state.clear()
    gc.collect()
    target.backend.release(target.device)
    return record


# ---- files and the table -------------------------------------------------------------------------------------------


def merge_write(path: Path, records: list[dict], key: Callable[[dict], tuple]) -> None:
    """Write `records` to the JSON lines at `path`, replacing older lines with the same key and keeping the rest."""
    fresh = {key(r) for r in records}
    kept = []
    if path.exists():
        kept = [r for r in map(json.loads, path.read_text().splitlines()) if key(r) not in fresh]
    with open(path, "w") as sink:
        for record in kept + records:
            sink.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / MiB:.0f}"


def table(out: Path) -> str:
    """A markdown table: each sharded case and rank, memory after each phase, losses against the single run."""
    single = {r["variant"]: r for r in read(out / "single.jsonl")}
    rows = [r for path in sorted(out.glob("sharded-n*.jsonl")) for r in read(path)]
    gpu = any(r["phases"].get("load", {}).get("allocated") is not None for r in [*rows, *single.values()])
    label = "allocated / reserved MiB" if gpu else "RSS MiB"

    def memory(phase: dict, peak: bool = False) -> str:
        if not gpu:
            return _mib(phase.get("peak_process_rss" if peak else "process_rss"))
        allocated, reserved = (
            (phase.get("peak_allocated"), phase.get("peak_reserved"))
            if peak
            else (
                phase.get("allocated"),
                phase.get("reserved"),
            )
        )
        return "" if allocated is None else f"{_mib(allocated)} / {_mib(reserved)}"

    head = ["variant", "wrap", "rank/N", f"load {label}", "prep", "lora", "shard", f"train peak {label}"]
    head += ["losses", "max abs diff vs one process", "4-bit bytes", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [*single.values(), *rows]:
        phases = r["phases"]
        reference = single.get(r["variant"], {}).get("losses") if r["wrap"] != "none" else None
        diff = ""
        if reference and r["losses"]:
            diff = f"{max(abs(a - b) for a, b in zip(r['losses'], reference, strict=False)):.2e}"
        check = r.get("packed_check")
        packed = ""
        if check and check["seen_in_forward"]:
            packed = "unchanged" if check["unchanged"] else f"{check['changed']} of {check['layers']} layers changed"
        error = r.get("error")
        row = [
            r["variant"],
            r["wrap"] + (f" ({r['mp']})" if r.get("mp") else ""),
            f"{r['rank']}/{r['world_size']}",
            *[memory(phases.get(p, {})) for p in ("load", "prep", "lora", "shard")],
            memory(phases.get("train", {}), peak=True),
            " ".join(f"{loss:.4f}" for loss in r["losses"]),
            diff,
            packed,
            "" if not error else f"{error['phase']}: {error['type']}: {error['message'][:160]}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    first = (rows or list(single.values()) or [{}])[0]
    note = (
        f"({first.get('preset')} preset, {first.get('steps')} steps x {first.get('seq_len')} tokens, "
        f"{first.get('device_name')}; memory after each phase, peak during training"
        + ("" if gpu else "; CPU: process RSS of each rank, peaks polled once per step")
        + ")"
    )
    return "\n".join(lines) + "\n" + note + "\n"


# ---- main -----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mistral-7b", help="a portable_kbit.compare preset or a checkpoint folder")
    parser.add_argument("--cache-dir", default=None, help="where presets are saved (default ~/.cache/portable_kbit)")
    parser.add_argument("--device", default="auto", help="auto (a GPU per process where there are GPUs), cuda, cpu")
    parser.add_argument("--out", default="benchmarks/results/fsdp")
    parser.add_argument("--cases", default=",".join(CASES), help=f"variant:wrap pairs (default {','.join(CASES)})")
    parser.add_argument("--mp", choices=("bf16", "none"), default="bf16", help="FSDP2 MixedPrecisionPolicy")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads per process (default 1, what torchrun gives each of several processes: the single "
        "run must use the same count, or its losses differ in the 4th decimal)",
    )
    parser.add_argument("--single", action="store_true", help="each variant in this one process, unsharded")
    parser.add_argument("--table", action="store_true", help="only write <out>/table.md from the JSON lines")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        (out / "table.md").write_text(table(out))
        print((out / "table.md").read_text())
        return 0

    from portable_kbit.tools import compare

    cases = [tuple(case.split(":")) for case in args.cases.split(",") if case]
    for variant, wrap in cases:
        if variant not in VARIANTS or wrap not in WRAPS:
            parser.error(f"unknown case {variant}:{wrap}; variants {VARIANTS}, wraps {WRAPS}")
    if args.seq_len is None:
        args.seq_len = compare.PRESETS[args.preset].seq_len if args.preset in compare.PRESETS else 512
    distributed = not args.single and "RANK" in os.environ
    if not args.single and not distributed:
        parser.error("start it with torchrun --nproc-per-node N (or pass --single for the unsharded reference)")
    world = World(args.device, distributed)
    if world.device.type == "cpu":
        torch.set_num_threads(args.threads)
    checkpoint = world.wait_for_checkpoint(args.preset, args.cache_dir)
    if args.single:
        runs = [(variant, "none") for variant in dict.fromkeys(v for v, _ in cases)]
    else:
        runs = cases
    records = []
    for variant, wrap in runs:
        started = time.perf_counter()
        record = run_case(args, world, checkpoint, variant, wrap)
        gathered = world.gather(record)
        if world.rank == 0:
            records += gathered
            status = record["error"] or record["losses"]
            print(f"# {variant} {wrap}: {status} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    if world.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.single:
            merge_write(out / "single.jsonl", records, lambda r: (r["variant"],))
        else:
            merge_write(
                out / f"sharded-n{world.size}.jsonl", records, lambda r: (r["variant"], r["wrap"], r["mp"], r["rank"])
            )
        (out / "table.md").write_text(table(out))
        print((out / "table.md").read_text())
    world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
