"""What the peak of a training step holds at long lengths: the forecast's fake step (no real memory) on the
Llama-3.1-8B shape with a few decoder layers, and the tensors live at its peak, grouped by the op that made them and,
for the large ones, the model code that called it.

    python benchmarks/peak_breakdown.py --seq-len 32768 --activations native --out benchmarks/results/cpu

The model: the `llama-3.1-8b` preset's config (vocabulary 128256, hidden 4096, MLP 14336, 32 / 8 heads, llama3 rope)
with `--layers` decoder layers, random bf16 weights on the CPU, not quantized (the layers' peak is the question, not
the weights), LoRA r32 on every linear layer of the layers, `token_blocks="auto"`, and offloaded checkpoints on a CPU
stand-in for a GPU with memory of its own (the host copies go to the meta device, so they are not counted where the
layers run, as on a GPU). The CPU backend's block sizes and attention kernel stand in for CUDA's: what is live is
representative, the bytes are not a GPU's measurement.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
import weakref
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portable_kbit.memory import livebytes, steps  # noqa: E402

MiB = 1 << 20
#: tensors at least this large get the model code that made them (a Python stack per tensor is slow)
WHERE_BYTES = 64 * MiB
#: the snapshot of live tensors is refreshed when the peak grows by 1%, or this much (each costs a walk over them)
SNAPSHOT_STEP = 16 * MiB
CODE = ("transformers/models", "peft/tuners", "portable_kbit/patches", "portable_kbit/model")


class PeakBreakdown(livebytes.LiveTensorBytes):
    """LiveTensorBytes that also remembers, for each tensor made in the step, the op and phase that made it, and keeps
    the list of live ones at (within SNAPSHOT_STEP of) the peak."""

    last: PeakBreakdown | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made: dict[int, tuple[int, str, str, str]] = {}
        self.snapshot: list[tuple[int, str, str, str]] = []
        self.snapshot_bytes = 0
        self.snapshot_phase = ""
        self.op = "?"
        PeakBreakdown.last = self

    def _add(self, storage: torch.UntypedStorage, counted: bool, static: bool) -> None:
        super()._add(storage, counted, static)
        if counted and not static:
            key = id(storage)
            self.made[key] = (
                storage.nbytes(),
                self.op,
                _where() if storage.nbytes() >= WHERE_BYTES else "",
                self.phase,
            )
            weakref.finalize(storage, self.made.pop, key, None)

    def _update_peak(self) -> None:
        if self.live_bytes > self.snapshot_bytes + min(SNAPSHOT_STEP, self.live_bytes // 100):
            self.snapshot_bytes, self.snapshot_phase = self.live_bytes, self.phase
            self.snapshot = list(self.made.values())
        super()._update_peak()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.op = str(func)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if any(part in f.filename for part in CODE)]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:][::-1])


def build(layers: int, activations: str, preset: str = "llama-3.1-8b") -> Any:
    import transformers
    from peft import LoraConfig, get_peft_model

    import portable_kbit
    from portable_kbit.backends.cpu import CpuBackend
    from portable_kbit.tools import presets

    config = presets.PRESETS[preset].config()
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with mock.patch.object(CpuBackend, "why_no_offload", lambda self, device: None):  # "memory of its own"
        portable_kbit.prepare(
            model,
            "cpu",
            target_modules=targets,
            activations=activations,
            token_blocks="auto",
            offload_checkpoints=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    portable_kbit.report(model).offload.host_device = torch.device("meta")
    return get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=targets))


def breakdown(model: Any, seq_len: int) -> dict[str, Any]:
    fake = steps.FakeSteps(model, torch.device("cpu"), 1, 3, sample_layers=False)
    started = time.perf_counter()
    with mock.patch.object(steps, "LiveTensorBytes", PeakBreakdown):  # the fake step's tracker, for this call
        peak = fake.peak(seq_len)
    tracker = PeakBreakdown.last
    assert tracker is not None
    by_op: collections.Counter[str] = collections.Counter()
    for nbytes, op, _, phase in tracker.snapshot:
        by_op[f"{phase}: {op}"] += nbytes
    largest = sorted(tracker.snapshot, key=lambda item: -item[0])[:20]
    return {
        "seq_len": seq_len,
        "peak_mib": round(peak / MiB, 1),
        "static_mib": round((fake.static_bytes or 0) / MiB, 1),
        "snapshot_mib": round(tracker.snapshot_bytes / MiB, 1),
        "snapshot_phase": tracker.snapshot_phase,
        "made_in_step_mib": round(sum(item[0] for item in tracker.snapshot) / MiB, 1),
        "by_op_mib": {op: round(b / MiB, 1) for op, b in by_op.most_common(12)},
        "largest": [{"mib": round(n / MiB, 1), "op": op, "where": where} for n, op, where, _ in largest],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _commit() -> str | None:
    """The checkout's commit (None outside a git checkout)."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--activations", default="native")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--preset", default="llama-3.1-8b", help="whose config (random weights): llama-3.1-8b, tiny")
    parser.add_argument("--out", type=Path, default=None, help="a folder: appends to peak_breakdown.jsonl there")
    args = parser.parse_args()
    from portable_kbit.tools.presets import versions

    model = build(args.layers, args.activations, args.preset)
    import portable_kbit

    prepared = portable_kbit.report(model.get_base_model())
    record = {"preset": args.preset, "activations": args.activations, "layers": args.layers}
    record["blocked_norms"] = len(prepared.blocked_norms) if prepared is not None else None
    record.update(breakdown(model, args.seq_len))
    record.update(date=time.strftime("%Y-%m-%d"), versions=versions(), commit=_commit())
    print(
        f"{args.activations}, {args.seq_len} tokens, {args.layers} layers: peak {record['peak_mib']} MiB "
        f"({record['snapshot_phase']}), of which made in the step {record['made_in_step_mib']} MiB"
    )
    for op, mib in record["by_op_mib"].items():
        print(f"  {mib:9.1f} MiB  {op}")
    for item in record["largest"]:
        print(f"  {item['mib']:7.1f} MiB  {item['op']:45s} {item['where']}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "peak_breakdown.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
