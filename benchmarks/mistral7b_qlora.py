"""The Mistral-7B QLoRA workload, peft vs portable_kbit, side by side in one run (see README, "Benchmarks").

    python benchmarks/mistral7b_qlora.py all --preset mistral-7b --out benchmarks/results/h100     # GPU
    python benchmarks/mistral7b_qlora.py all --preset cpu-small --out benchmarks/results/cpu       # 2-core CPU
    python benchmarks/mistral7b_qlora.py table benchmarks/results/h100 benchmarks/results/cpu      # README table

`all` builds a random-weight checkpoint of the preset's shape locally (no download), then runs each variant in a fresh
process: load (bitsandbytes nf4 + double quant, compute bf16), prepare, LoRA r=16 on q,k,v,o, non-reentrant gradient
checkpointing, model.train(), 5 AdamW steps (lr 1e-4) on one sequence. Each phase prints one JSON line. With --fit
(CUDA) it also finds, per variant, the longest sequence (multiples of 256) that loads, prepares and trains 5 steps with
the allocator capped at 8 GiB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MiB = 1 << 20
GiB = 1 << 30
VARIANTS = ("none", "peft-noclear", "peft", "ours-fp32", "ours-native", "ours-peft")
FIT_VARIANTS = ("peft", "ours-fp32", "ours-native")
PRESETS: dict[str, dict[str, Any]] = {
    "mistral-7b": dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, seq_len=512),
    # a few hundred MB in bf16: the same comparison in a couple of minutes on a 2-core CPU
    "cpu-small": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=8, seq_len=128),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ---- measurement ---------------------------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "portable-kbit", "psutil"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()
    return {"device_name": name, "versions": versions, "python": platform.python_version()}


def measure(device: str) -> dict[str, Optional[int]]:
    import psutil
    import torch

    out: dict[str, Optional[int]] = {
        "host_available": psutil.virtual_memory().available,
        "process_rss": psutil.Process().memory_info().rss,
        "allocated": None, "reserved": None, "peak_allocated": None, "peak_reserved": None,
    }
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out.update(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved(),
                   peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved())
    return out


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


class Recorder:
    def __init__(self, variant: str, device: str, extra: dict[str, Any]):
        self.variant, self.device, self.extra = variant, device, extra
        self.started = time.perf_counter()

    def phase(self, name: str, **fields: Any) -> dict[str, Any]:
        record = {"variant": self.variant, "phase": name, "elapsed_s": round(time.perf_counter() - self.started, 3),
                  **measure(self.device), **fields, **self.extra}
        print(json.dumps(record), flush=True)
        return record


# ---- one variant, in its own process -------------------------------------------------------------------------------


def load(checkpoint: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    device_map = {"": 0} if device.startswith("cuda") else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization, dtype=torch.bfloat16,
                                                device_map=device_map)


def prepare_variant(model, variant: str, device: str):
    """Returns the prepare call's own duration in seconds (None for no prep)."""
    import torch

    import inspect

    import portable_kbit
    from peft import prepare_model_for_kbit_training

    checkpointing = {"use_reentrant": False}
    started = time.perf_counter()  # after the imports: both sides are timed on the call alone
    if variant == "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        return None
    if variant.startswith("peft"):
        kwargs: dict[str, Any] = {"gradient_checkpointing_kwargs": checkpointing}
        if "auto_clear_cache" in inspect.signature(prepare_model_for_kbit_training).parameters:
            kwargs["auto_clear_cache"] = variant != "peft-noclear"
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, **kwargs)
    else:
        policy = {"ours-fp32": ("adjacent", "fp32"), "ours-native": ("adjacent", "native"),
                  "ours-peft": ("peft", "fp32")}[variant]
        portable_kbit.prepare(model, device=device, target_modules=TARGETS, upcast=policy[0], activations=policy[1],
                              gradient_checkpointing_kwargs=checkpointing)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def attach_lora_and_optimizer(model):
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()  # transformers only checkpoints activations in training mode
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def train_steps(model, optimizer, seq_len: int, steps: int, vocab: int, device: str) -> list[float]:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq_len), generator=generator).to(device)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss.item()), 4))
    return losses


def run_variant(checkpoint: str, variant: str, device: str, seq_len: int, steps: int, vocab: int) -> None:
    import torch

    torch.manual_seed(0)
    record = Recorder(variant, device, {"seq_len": seq_len})
    record.phase("start", **environment(device))
    model = load(checkpoint, device)
    record.phase("loaded")
    reset_peak(device)
    before = measure(device)
    seconds = prepare_variant(model, variant, device)
    prepared = record.phase("prepared", seconds=seconds)
    prepared_delta = {k: _delta(prepared[k], before[k]) for k in ("allocated", "reserved", "process_rss")}
    prepared_delta["peak_allocated"] = _delta(prepared["peak_allocated"], before["allocated"])
    extra: dict[str, Any] = {"prepare_delta": prepared_delta}
    if variant.startswith("ours"):
        import portable_kbit

        report = portable_kbit.report(model)
        extra["report"] = {k: v for k, v in report.to_dict().items() if k not in ("before", "after", "peak")}
    model, optimizer = attach_lora_and_optimizer(model)
    fp32 = sorted(n for n, p in model.named_parameters() if p.dtype == torch.float32 and "lora_" not in n)
    record.phase("lora_attached", fp32_base_params=len(fp32), fp32_base_param_names=fp32[:8], **extra)
    reset_peak(device)
    losses = train_steps(model, optimizer, seq_len, steps, vocab, device)
    record.phase("trained", losses=losses)


def fit_variant(checkpoint: str, variant: str, device: str, cap_bytes: int, start: int, stop: int, vocab: int) -> None:
    """Longest sequence (multiples of 256) that trains 5 steps with the allocator capped at cap_bytes."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total, 0)
    record = Recorder(variant, device, {"cap_mib": cap_bytes // MiB})
    model = load(checkpoint, device)
    prepare_variant(model, variant, device)
    model, optimizer = attach_lora_and_optimizer(model)
    record.phase("fit_ready")
    longest = None
    for seq_len in range(start, stop + 1, 256):
        reset_peak(device)
        try:
            train_steps(model, optimizer, seq_len, 5, vocab, device)
        except torch.OutOfMemoryError:
            record.phase("fit_oom", seq_len=seq_len)
            break
        longest = seq_len
        record.phase("fit_ok", seq_len=seq_len)
    record.phase("fit_result", longest=longest, tried_up_to=stop)


def _delta(after: Optional[int], before: Optional[int]) -> Optional[int]:
    return None if after is None or before is None else after - before


# ---- orchestration ---------------------------------------------------------------------------------------------------


def build_checkpoint(preset: str, out: str, device: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    path = Path(out)
    if (path / "config.json").exists():
        return str(path)
    shape = {k: v for k, v in PRESETS[preset].items() if k != "seq_len"}
    config = MistralConfig(tie_word_embeddings=False, max_position_embeddings=8192, sliding_window=None,
                           bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if device.startswith("cuda") else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    gc.collect()
    return str(path)


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = build_checkpoint(args.preset, args.checkpoint, args.device)
    print(f"# checkpoint ready in {time.perf_counter() - started:.0f} s: {checkpoint}", file=sys.stderr, flush=True)
    seq_len = args.seq_len or PRESETS[args.preset]["seq_len"]
    vocab = PRESETS[args.preset]["vocab_size"]
    jobs = []
    if not args.fit_only:
        jobs += [(v, ["variant", v, "--seq-len", str(seq_len)], "phases.jsonl") for v in args.variants.split(",")]
    if args.fit or args.fit_only:
        jobs += [(v, ["fit", v, "--fit-start", str(args.fit_start), "--fit-stop", str(args.fit_stop)], "fit.jsonl")
                 for v in FIT_VARIANTS]
    for variant, command, filename in jobs:
        process = subprocess.run(
            [sys.executable, __file__, *command, "--checkpoint", checkpoint, "--device", args.device,
             "--vocab", str(vocab), "--steps", str(args.steps)],
            capture_output=True, text=True,
        )
        lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
        with open(out / filename, "a") as sink:
            for line in lines:
                sink.write(line + "\n")
        status = "ok" if process.returncode == 0 else f"exit {process.returncode}: {process.stderr[-1500:]}"
        print(f"# {filename} {variant}: {status} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("all", "variant", "fit", "table"))
    parser.add_argument("names", nargs="*", help="variant name (variant/fit) or result folders (table)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="mistral-7b")
    parser.add_argument("--checkpoint", default=None, help="where the random-weight checkpoint is (built if missing)")
    parser.add_argument("--device", default=None, help="cuda:0 or cpu (default: cuda:0 when available)")
    parser.add_argument("--out", default="benchmarks/results/run")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--fit", action="store_true", help="also run the 8 GiB fit search (CUDA)")
    parser.add_argument("--fit-only", action="store_true")
    parser.add_argument("--fit-start", type=int, default=1024)
    parser.add_argument("--fit-stop", type=int, default=6144)
    args = parser.parse_args(argv)
    if args.mode == "table":
        from table import render  # benchmarks/table.py

        print(render([Path(p) for p in args.names]))
        return 0
    if args.device is None:
        import torch

        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if args.checkpoint is None:
        args.checkpoint = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"portable_kbit_{args.preset}")
    if args.mode == "all":
        run_all(args)
    elif args.mode == "variant":
        run_variant(args.checkpoint, args.names[0], args.device, args.seq_len or 512, args.steps, args.vocab)
    else:
        fit_variant(args.checkpoint, args.names[0], args.device, 8 * GiB, args.fit_start, args.fit_stop, args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
