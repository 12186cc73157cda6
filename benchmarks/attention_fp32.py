"""One grouped-query attention call, forward and backward: fp32 through SDPA with enable_gqa, through portable_kbit's
attention, with k/v expanded, and bf16 with enable_gqa; peak memory, time and the kernel that ran.

    python benchmarks/attention_fp32.py --device cuda --out benchmarks/results/h100/attention_fp32.jsonl   # GPU
    python benchmarks/attention_fp32.py --device cpu                                                       # CPU

The call is Mistral-7B's: batch 1, 32 query heads, 8 k/v heads, head dim 128, causal, no mask (what transformers
passes for batch 1 or padding-free batches), at L = 2048, 3072, 4096 on an accelerator (256, 512 on the CPU; or
--lengths). Variants:

- ``sdpa-fp32-gqa``: ``scaled_dot_product_attention(..., enable_gqa=True)`` on fp32 q/k/v, as transformers' sdpa calls
  it once prepare() leaves the hidden states in fp32 (the math kernel on CUDA with torch <= 2.11);
- ``ours-fp32``: ``portable_kbit.patches.attention_call.attention_forward``, which asks the device's Backend whether to
  expand k/v (``expanded`` in the record says what it chose);
- ``fp32-expanded``: k/v repeated to the query heads (transformers' ``repeat_kv``) and no enable_gqa, always;
- ``sdpa-bf16-gqa``: bf16 q/k/v with enable_gqa (the native flow).

One JSON line per (L, variant): ``peak_mib`` is the allocator's peak during the call minus what was allocated before
q/k/v were made (inputs, output and gradients included; null where the device keeps no peak, e.g. the CPU),
``ms`` the median of --repeats timed calls after a warm-up, ``kernel`` the SDPA kernel op the profiler saw
(``efficient``, ``flash``, ``cudnn``, ``math``, ``flash_cpu`` ...), and ``oom`` true where the call ran out of memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from portable_kbit import backends
from portable_kbit.backends.sdpa import sdpa_kernel_choice
from portable_kbit.patches import attention_call

MiB = 1 << 20
VARIANTS = ("sdpa-fp32-gqa", "ours-fp32", "fp32-expanded", "sdpa-bf16-gqa")
# SDPA's kernel ops as the profiler names them (the CPU-side aten op, on every device)
KERNEL_OPS = {
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "_scaled_dot_product_attention_math_for_mps": "math_mps",
    "_scaled_dot_product_attention_math": "math",
}


class AttentionModule(torch.nn.Module):
    """What transformers' sdpa function reads from an attention layer."""

    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def make_inputs(length: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator(device="cpu").manual_seed(0)

    def tensor(h: int) -> torch.Tensor:
        x = torch.randn(1, h, length, head_dim, generator=generator).to(device=device, dtype=dtype)
        return x.requires_grad_()

    return tensor(heads), tensor(kv_heads), tensor(kv_heads)


def run_call(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import repeat_kv

    sdpa = torch.nn.functional.scaled_dot_product_attention
    if variant == "ours-fp32":
        out, _ = attention_call.attention_forward(AttentionModule(groups), q, k, v, None)
    elif variant == "fp32-expanded":
        out = sdpa(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)
    else:
        out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    out.float().square().mean().backward()
    return out


def dispatcher_choice(variant: str, q, k, v, groups: int) -> str | None:
    """The kernel SDPA's dispatcher names for the variant's call (None where torch cannot say)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    with torch.no_grad():
        if variant == "fp32-expanded":
            return sdpa_kernel_choice(q, repeat_kv(k, groups), repeat_kv(v, groups), None, 0.0, True, False)
        if variant == "ours-fp32" and attention_call.expands_kv(AttentionModule(groups), q, k, v, None, 0.0, None):
            return dispatcher_choice("fp32-expanded", q, k, v, groups)
    return sdpa_kernel_choice(q, k, v, None, 0.0, True, enable_gqa=True)


def kernel_that_ran(variant: str, q, k, v, groups: int) -> str | None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_call(variant, q, k, v, groups)
    names = {event.key.removeprefix("aten::") for event in prof.key_averages()}
    for op, kernel in KERNEL_OPS.items():  # most specific names first
        if op in names:
            return kernel
    return None


def measure(variant: str, length: int, args: argparse.Namespace, target: backends.Target) -> dict[str, Any]:
    device, backend = target.device, target.backend
    groups = args.heads // args.kv_heads
    dtype = torch.bfloat16 if variant.endswith("bf16-gqa") else torch.float32
    record: dict[str, Any] = {"L": length, "variant": variant, "dtype": str(dtype).removeprefix("torch.")}
    backend.synchronize(device)
    backend.release(device)
    base = backend.allocator_stats(device).allocated
    try:
        q, k, v = make_inputs(length, args.heads, args.kv_heads, args.head_dim, dtype, device)
        if variant == "ours-fp32":
            record["expanded"] = attention_call.expands_kv(AttentionModule(groups), q, k, v, None, 0.0, None)
        record["dispatcher"] = dispatcher_choice(variant, q, k, v, groups)
        run_call(variant, q, k, v, groups)  # warm-up: one-time workspaces stay out of the peak
        for t in (q, k, v):
            t.grad = None
        backend.synchronize(device)
        backend.reset_peak(device)
        run_call(variant, q, k, v, groups)  # the measured call
        backend.synchronize(device)
        peak = backend.allocator_stats(device).peak_allocated
        record["peak_mib"] = None if peak is None or base is None else round((peak - base) / MiB, 1)
        times = []
        for _ in range(args.repeats):
            for t in (q, k, v):
                t.grad = None
            backend.synchronize(device)
            start = time.perf_counter()
            run_call(variant, q, k, v, groups)
            backend.synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
        record["ms"] = round(statistics.median(times), 3)
        record["kernel"] = kernel_that_ran(variant, q, k, v, groups)
        record["oom"] = False
    except torch.OutOfMemoryError:
        record["oom"] = True
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, rocm, mps or cpu")
    parser.add_argument("--lengths", default=None, help="comma-separated; default 2048,3072,4096 (256,512 on cpu)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    target = backends.resolve(args.device)
    default = "256,512" if target.device.type == "cpu" else "2048,3072,4096"
    lengths = [int(x) for x in (args.lengths or default).split(",")]
    header = {
        "device": str(target.device),
        "backend": target.backend.name,
        "name": torch.cuda.get_device_name(target.device) if target.device.type == "cuda" else target.device.type,
        "torch": torch.__version__,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
    }
    lines = []
    for length in lengths:
        for variant in args.variants.split(","):
            lines.append(json.dumps({**header, **measure(variant, length, args, target)}))
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as out:
            out.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
