"""The main job on a built-in tiny model, no download: quantize, prepare, attach LoRA, train a few steps.

`portable-kbit demo` prints what `run()` returns. It finishes in seconds on a 2-core CPU.
"""

from __future__ import annotations

import time
from typing import Any

from .. import backends
from ..pipeline.prepare import prepare, report
from . import quantizer_probe as quantizers
from . import tiny
from .quiet import quiet

ARCH = "llama"
CHECKPOINTING = {"use_reentrant": False}


def run(
    device: str = "auto",
    steps: int = 5,
    quantizer: str | None = None,
    activations: str = "fp32",
    lr: float = 1e-2,
    seq_len: int = 32,
) -> dict[str, Any]:
    """Build a tiny Llama-family model, quantize it, prepare() it, attach LoRA and train `steps` AdamW steps.

    Args:
        device: "auto" (the first available accelerator, else the CPU), "cuda", "cuda:N", "rocm", "mps" or "cpu".
        steps: optimizer steps on one random sequence (a memorization task: the loss must fall).
        quantizer: one of portable_kbit.tools.tiny.QUANTIZERS; None: the first that works here
            (bitsandbytes nf4 on CUDA, ROCm and CPU; optimum-quanto int4 on MPS and as the fallback).
        activations: passed to prepare() (one of portable_kbit.pipeline.checks.ACTIVATIONS: "fp32", "layer",
            "native").
        lr: AdamW learning rate (high, so that a few steps show the loss falling).
        seq_len: tokens in the training sequence.

    Returns:
        a dict: "report" (the PrepReport), "losses" (floats, one per step), "device" (the torch device string),
        "backend", "quantizer", "model" (the trained PeftModel) and "seconds" (wall time of the whole job).

    The libraries' progress bars, notices and warnings are kept off the console meanwhile (portable_kbit.tools.quiet;
    wrap the call in ``quiet(False)`` to see them); portable_kbit's own warnings still show.
    """
    if steps < 1:
        raise ValueError(f"steps={steps!r}: train at least one step")
    with quiet():
        return _run(device, steps, quantizer, activations, lr, seq_len)


def _run(device: str, steps: int, quantizer: str | None, activations: str, lr: float, seq_len: int) -> dict[str, Any]:
    started = time.perf_counter()
    target = backends.resolve(device)
    torch_device = str(target.device)
    if quantizer is None:
        quantizer = quantizers.choose(target.backend.name, target.device)
    path = tiny.checkpoint(ARCH)
    model = tiny.load(path, quantizer, torch_device)
    targets = tiny.LORA_TARGETS[ARCH]
    model = prepare(
        model,
        torch_device,
        target_modules=targets,
        activations=activations,
        gradient_checkpointing_kwargs=CHECKPOINTING,
    )
    prep_report = report(model)
    model, losses = tiny.train_lora(model, targets, steps=steps, lr=lr, length=seq_len)
    return {
        "report": prep_report,
        "losses": losses,
        "device": torch_device,
        "backend": target.backend.name,
        "quantizer": quantizer,
        "model": model,
        "seconds": time.perf_counter() - started,
    }
