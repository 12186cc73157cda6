"""Measure the QLoRA job phase by phase for several preparation variants, each in a fresh process.

Phases: ``start`` (imports done, nothing loaded), ``load`` (from_pretrained through the quantizer), ``prep`` (the
variant's preparation), ``lora`` (get_peft_model: r=16 on the attention projections), ``train`` (AdamW lr 1e-4 on one
random sequence, non-reentrant gradient checkpointing, ``model.train()`` first). Each phase gives one JSON object:
phase, seconds, allocated, reserved, peak_allocated, peak_reserved (allocator numbers, None on CPU), device_free,
host_available, host_total, process_rss, peak_process_rss (polled), and losses for ``train``.

``run_variant()`` is the measurement itself (importable: benchmark scripts call it); ``compare()`` runs every variant
in its own subprocess (``python -m portable_kbit compare PATH --variant NAME``) so that no variant inherits another's
allocator cache, and gathers the records; ``table()`` and ``plot()`` present them.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .. import backends
from ..memory import snapshots
from ..model.hf import enable_checkpointing
from . import quantizer_probe as quantizers
from . import tiny
from .mixed_ablation import mixed_ablation
from .presets import PRESETS, Preset, build_preset, child_env, lora_targets, materialize, versions

PHASES = ("start", "load", "prep", "lora", "train")
#: what the train phase learns: one random sequence by heart, or a rule (arithmetic progressions of tokens, one per
#: sequence: the next token is the last one plus the sequence's own stride) on a fixed batch, scored on held-out ones
TASKS = ("one-sequence", "progressions")
#: the progressions task: sequences per batch, and the alphabet they run over (token ids from 16 on)
PROGRESSION_ROWS = 8
PROGRESSION_TOKENS = 64
CHECKPOINTING = {"use_reentrant": False}

VARIANTS: dict[str, str] = {
    "none": "no preparation (gradient checkpointing only)",
    "peft-noclear": "peft.prepare_model_for_kbit_training(auto_clear_cache=False)",
    "peft": "peft.prepare_model_for_kbit_training (its defaults)",
    "ours-fp32": "portable_kbit.prepare(activations='fp32')",
    "ours-native": "portable_kbit.prepare(activations='native')",
    "ours-mixed": "portable_kbit.prepare(activations='mixed')",
    "ours-mixed-attention": "activations='mixed' with its frozen MLPs left in fp32 (ablation: attention's half)",
    "ours-mixed-mlp": "activations='mixed' with attention left in fp32 (ablation: the frozen MLPs' half)",
    "ours-peft": "portable_kbit.prepare(upcast='peft')",
    "ours-layer": "portable_kbit.prepare(activations='layer')",
    "ours-fp32-upcast": "portable_kbit.prepare(activations='fp32', frozen_norms='upcast')",
    "ours-fp32-offload": "portable_kbit.prepare(activations='fp32', offload_checkpoints=True)",
    "ours-native-offload": "portable_kbit.prepare(activations='native', offload_checkpoints=True)",
    "ours-fp32-tf32": "portable_kbit.prepare(activations='fp32', tf32=True)",
    "ours-mixed-tf32": "portable_kbit.prepare(activations='mixed', tf32=True)",
}
DEFAULT_VARIANTS = ("none", "peft-noclear", "peft", "ours-fp32", "ours-native", "ours-peft")


# ---- one variant, in this process --------------------------------------------------------------------------------


class _Stop(Exception):
    """A phase failed; its record says why."""


class _Phases:
    def __init__(self, target: backends.Target, base: dict[str, Any], emit: Callable[[dict], None] | None):
        self.target, self.base, self.emit = target, base, emit
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[tuple[dict[str, Any], list]]:
        backend, device = self.target.backend, self.target.device
        backend.reset_peak(device)
        before = snapshots.take(self.target)
        started = time.perf_counter()
        extra: dict[str, Any] = {}
        samples: list[snapshots.MemorySnapshot] = []
        error: BaseException | None = None
        try:
            yield extra, samples
            backend.synchronize(device)
        except Exception as failure:
            error = failure
        seconds = time.perf_counter() - started
        after = snapshots.take(self.target)
        peak = snapshots.peak_of(before, [*samples, after])
        record = {
            **self.base,
            "phase": name,
            "seconds": round(seconds, 4),
            "allocated": after.allocated,
            "reserved": after.reserved,
            "peak_allocated": peak.allocated,
            "peak_reserved": peak.reserved,
            "device_free": after.device_free,
            "device_total": after.device_total,
            "host_available": after.host_available,
            "host_total": after.host_total,
            "process_rss": after.process_rss,
            "peak_process_rss": peak.process_rss,
            "unified": after.unified,
            **extra,
        }
        if error is not None:
            first_line = (str(error).strip().splitlines() or [""])[0]
            record["error"] = f"{type(error).__name__}: {first_line[:300]}"
        self.records.append(record)
        if self.emit is not None:
            self.emit(record)
        if error is not None:
            raise _Stop(record["error"])


def run_variant(
    checkpoint_path: str,
    variant: str,
    device: str = "auto",
    steps: int = 5,
    seq_len: int = 512,
    quantizer: str | None = None,
    *,
    targets: Sequence[str] | None = None,
    lr: float = 1e-4,
    r: int = 16,
    memory_fraction: float | None = None,
    emit: Callable[[dict], None] | None = None,
    data_seed: int = 1,
    task: str = "one-sequence",
) -> list[dict[str, Any]]:
    """Run the job for one variant in this process; returns one record per phase (the failing phase last, with
    "error"). Run each variant in a fresh process for comparable numbers: allocator caches and peaks carry over.

    Args:
        checkpoint_path: a local transformers checkpoint (a preset's folder from ``materialize()``).
        variant: one of VARIANTS.
        device: "auto", "cuda", "cuda:N", "rocm", "mps" or "cpu".
        steps, seq_len: training steps on one random sequence of seq_len tokens.
        quantizer: one of portable_kbit.tools.tiny.QUANTIZERS; None: the backend's first installed preference.
        targets: LoRA target modules; None: the attention projections for the checkpoint's model_type.
        lr, r: AdamW learning rate and LoRA rank (lora_alpha = 2 r).
        memory_fraction: cap this process's allocator at this fraction of the GPU (CUDA and ROCm only).
        emit: called with each record as soon as its phase ends (the subprocess prints them).
        data_seed: the seed of the random training sequence (or of the progressions' starts and strides).
        task: one of TASKS: "one-sequence" (the default) or "progressions", which also records "eval_losses", the
            loss on held-out progressions after each step.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    target = backends.resolve(device)
    quantizer = quantizer or quantizers.choose(target.backend.name)
    targets = list(targets) if targets else lora_targets(checkpoint_path)
    base = {
        "variant": variant,
        "checkpoint": checkpoint_path,
        "device": str(target.device),
        "backend": target.backend.name,
        "quantizer": quantizer,
        "steps": steps,
        "seq_len": seq_len,
        "task": task,
    }
    phases = _Phases(target, base, emit)
    try:
        with phases.phase("start") as (extra, _):
            if memory_fraction is not None:
                cap_memory(target, memory_fraction)
                extra["memory_fraction"] = memory_fraction
            extra["versions"] = versions()
            # peft is imported here, so that no variant's "prep" phase pays for the import (portable_kbit's own
            # prepare module is imported with the package)
            importlib.import_module("peft")
        with phases.phase("load") as (extra, _):
            model = tiny.load(checkpoint_path, quantizer, str(target.device))
            # The loader leaves a full garbage collection due: the next few thousand allocations of whatever runs
            # next trigger it (0.2 s on a 32-layer model). Collected here, so no variant's "prep" pays for it.
            gc.collect()
        with phases.phase("prep") as (extra, _):
            model = prepare_variant(model, variant, target, targets, extra)
            extra["fp32_frozen_parameters"] = sum(
                1 for p in model.parameters() if p.dtype == torch.float32 and not p.requires_grad
            )
        with phases.phase("lora") as (extra, _):
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
            model = get_peft_model(model, config)
            extra["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        with phases.phase("train") as (extra, samples):
            if task == "progressions":
                extra["losses"], extra["eval_losses"] = train_progressions(model, steps, seq_len, lr, data_seed)
            else:
                extra["losses"] = train_steps(model, target, steps, seq_len, lr, samples, data_seed)
            offloaded = _offload_of(model)
            if offloaded is not None:
                extra["offload"] = offloaded
    except _Stop:
        pass
    return phases.records


def _offload_of(model: Any) -> dict[str, Any] | None:
    """What prepare(offload_checkpoints=True) sent to the host during the train phase (None: not on)."""
    from ..pipeline.prepare import report

    done = report(model.get_base_model()) if hasattr(model, "get_base_model") else None
    return done.offload.to_dict() if done is not None and done.offload is not None else None


def prepare_variant(model: Any, variant: str, target: backends.Target, targets: Any, extra: dict) -> Any:
    """Apply one variant's preparation to a loaded model; notes for the record go into `extra`."""
    if variant == "none":
        enable_checkpointing(model, CHECKPOINTING)
        return model
    if variant.startswith("peft"):
        from peft import prepare_model_for_kbit_training

        kwargs: dict[str, Any] = {"use_gradient_checkpointing": True, "gradient_checkpointing_kwargs": CHECKPOINTING}
        if "auto_clear_cache" in inspect.signature(prepare_model_for_kbit_training).parameters:
            kwargs["auto_clear_cache"] = variant == "peft"
        elif variant == "peft-noclear":
            extra["note"] = "this peft has no auto_clear_cache: ran its only behaviour"
        with warnings.catch_warnings():  # peft's own calls of names transformers deprecated: not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            return prepare_model_for_kbit_training(model, **kwargs)
    from ..pipeline.prepare import prepare, report

    by_variant: dict[str, dict[str, Any]] = {
        "ours-fp32": {},
        "ours-native": {"activations": "native"},
        "ours-mixed": {"activations": "mixed"},
        "ours-mixed-attention": {"activations": "mixed"},
        "ours-mixed-mlp": {"activations": "mixed"},
        "ours-peft": {"upcast": "peft"},
        "ours-layer": {"activations": "layer"},
        "ours-fp32-upcast": {"frozen_norms": "upcast"},
        "ours-fp32-offload": {"offload_checkpoints": True},
        "ours-native-offload": {"activations": "native", "offload_checkpoints": True},
        "ours-fp32-tf32": {"tf32": True},
        "ours-mixed-tf32": {"activations": "mixed", "tf32": True},
    }
    options = by_variant[variant]
    ablation = variant.removeprefix("ours-mixed-") if variant in ("ours-mixed-attention", "ours-mixed-mlp") else None
    with mixed_ablation(ablation):
        model = prepare(
            model, str(target.device), target_modules=targets, gradient_checkpointing_kwargs=CHECKPOINTING, **options
        )
    done = report(model)
    if done is None:  # prepare() always leaves a report: its absence is a bug, not a result
        raise RuntimeError("prepare() returned without a report")
    extra["prep_report"] = {
        "policy": done.policy,
        "activations": done.activations,
        "upcast": len(done.upcast),
        "upcast_norms": len(done.upcast_norms),
        "input_guards": done.input_guards,
        "skipped_quantized": done.skipped_quantized,
        "chunks": done.chunks,
        "chunk_bytes": done.chunk_bytes,
        "seconds": round(done.seconds, 4),
        "trace_seconds": round(done.trace_seconds, 4),
        "offload": done.offload_reason,
        "tf32": done.tf32_reason,
    }
    return model


def train_steps(
    model: Any, target: backends.Target, steps: int, seq_len: int, lr: float, samples: list, data_seed: int = 1
) -> list[float]:
    """`steps` AdamW steps on one random sequence (drawn with `data_seed`) in training mode; the losses."""
    model.train()  # transformers checkpoints only in training mode
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    ids = tiny.batch(vocab, seq_len, seed=data_seed, device=str(device))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        samples.append(snapshots.take(target))  # gradients alive: the polled peak where no allocator keeps one
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss.item()), 4))
    return losses


def progressions(rows: int, length: int, seed: int, device: str) -> torch.Tensor:
    """[rows, length] token ids: each row an arithmetic progression over PROGRESSION_TOKENS ids (from 16 on, clear of
    special tokens), with its own start and stride (1 to 7), drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, PROGRESSION_TOKENS, (rows, 1), generator=generator)
    strides = torch.randint(1, 8, (rows, 1), generator=generator)
    steps = torch.arange(length)[None, :]
    return (16 + (starts + strides * steps) % PROGRESSION_TOKENS).to(device)


def train_progressions(
    model: Any, steps: int, seq_len: int, lr: float, data_seed: int = 1
) -> tuple[list[float], list[float]]:
    """`steps` AdamW steps on a fixed batch of progressions; after each, the loss on held-out progressions (another
    seed) in training mode without gradients. Returns (training losses, held-out losses)."""
    model.train()
    device = str(model.get_input_embeddings().weight.device)
    train = progressions(PROGRESSION_ROWS, seq_len, data_seed, device)
    held_out = progressions(PROGRESSION_ROWS, seq_len, data_seed + 10_000, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, eval_losses = [], []
    for _ in range(steps):
        loss = model(input_ids=train, labels=train).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss.item()), 4))
        with torch.no_grad():
            eval_losses.append(round(float(model(input_ids=held_out, labels=held_out).loss.item()), 4))
    return losses, eval_losses


def cap_memory(target: backends.Target, fraction: float) -> None:
    """Cap the allocator of this process at `fraction` of the device (the backend's own per-process fraction: of the
    GPU's total memory on CUDA and ROCm, of Metal's recommended working set on MPS)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"memory_fraction={fraction!r} must be in (0, 1]")
    if not target.backend.can_cap(target.device):
        raise ValueError(
            "--memory-fraction needs a backend that can cap its allocator (CUDA, ROCm, MPS), "
            f"not {target.backend.name}"
        )
    target.backend.set_memory_fraction(target.device, float(fraction))


# ---- every variant, each in a fresh process ------------------------------------------------------------------------


def run_in_subprocess(
    checkpoint_path: str,
    variant: str,
    device: str,
    steps: int,
    seq_len: int,
    quantizer: str | None,
    targets: Sequence[str] | None = None,
    memory_fraction: float | None = None,
    emit: Callable[[dict], None] | None = None,
    timeout: float | None = None,
    data_seed: int = 1,
    env: dict[str, str] | None = None,
    verbose: bool = False,
    task: str = "one-sequence",
    lr: float = 1e-4,
) -> list[dict[str, Any]]:
    """run_variant() in a fresh Python process; its phase records (a "process" record if it died without one).
    `env`: extra environment variables for the child (PYTORCH_CUDA_ALLOC_CONF, say). The child's stderr is kept
    aside (its last line explains a crash); with `verbose`, the child keeps the libraries' output (--verbose) and
    its stderr is copied to this process's stderr when it ends."""
    command = [
        sys.executable,
        "-m",
        "portable_kbit",
        "compare",
        checkpoint_path,
        "--variant",
        variant,
        "--device",
        device,
        "--steps",
        str(steps),
        "--seq-len",
        str(seq_len),
    ]
    if quantizer:
        command += ["--quantizer", quantizer]
    if targets:
        command += ["--targets", ",".join(targets)]
    if memory_fraction is not None:
        command += ["--memory-fraction", str(memory_fraction)]
    if data_seed != 1:
        command += ["--data-seed", str(data_seed)]
    if task != "one-sequence":
        command += ["--task", task]
    if lr != 1e-4:
        command += ["--lr", repr(lr)]
    if verbose:
        command.append("--verbose")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryFile(mode="w+") as errors:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=errors, text=True, env={**child_env(), **(env or {})}
        )
        assert process.stdout is not None
        for line in process.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "phase" in record:
                records.append(record)
                if emit is not None:
                    emit(record)
        code = process.wait(timeout=timeout)
        if verbose:
            errors.seek(0)
            sys.stderr.write(errors.read())
            sys.stderr.flush()
        if code != 0 and not any("error" in r for r in records):
            errors.seek(0)
            tail = errors.read()[-2000:].strip().splitlines()
            record = {
                "variant": variant,
                "checkpoint": checkpoint_path,
                "device": device,
                "phase": "process",
                "error": f"exit status {code}: {tail[-1] if tail else 'no output'}",
            }
            records.append(record)
            if emit is not None:
                emit(record)
    return records


def compare(
    path_or_preset: str,
    device: str = "auto",
    steps: int | None = None,
    seq_len: int | None = None,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    quantizer: str | None = None,
    memory_fraction: float | None = None,
    cache_dir: str | None = None,
    emit: Callable[[dict], None] | None = None,
    *,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Every variant in its own process on a local checkpoint or a preset; all their phase records.

    steps and seq_len default to the preset's (3 and 32 for "tiny", 5 and 512 for "mistral-7b"; 5 and 512 for a
    local checkpoint). This process never touches the accelerator: each child measures from a clean allocator.
    `verbose`: the children keep the libraries' output and pass it on (run_in_subprocess()).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    preset = PRESETS.get(path_or_preset) if not os.path.isdir(path_or_preset) else None
    steps = steps or (preset.steps if preset else 5)
    seq_len = seq_len or (preset.seq_len if preset else 512)
    target = backends.resolve(device)
    quantizer = quantizer or quantizers.choose(target.backend.name)
    path = materialize(path_or_preset, cache_dir, device)
    targets = lora_targets(path)
    records: list[dict[str, Any]] = []
    for variant in variants:
        records += run_in_subprocess(
            path, variant, device, steps, seq_len, quantizer, targets, memory_fraction, emit, verbose=verbose
        )
    return records


# The presets and versions() live in portable_kbit.tools.presets; they stay importable from here for existing scripts.
__all__ = [
    "CHECKPOINTING",
    "DEFAULT_VARIANTS",
    "PHASES",
    "PRESETS",
    "VARIANTS",
    "Preset",
    "build_preset",
    "cap_memory",
    "compare",
    "lora_targets",
    "materialize",
    "prepare_variant",
    "run_in_subprocess",
    "run_variant",
    "train_steps",
    "versions",
]
