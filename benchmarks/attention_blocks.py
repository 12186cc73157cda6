"""The memory and time of one attention call (forward and backward), per path: the fused kernel, the math kernel (what
training attention runs on Apple MPS: [heads, L, L] scores), and attention over blocks of queries
(portable_kbit/patches/query_blocks.py, what prepare() runs where no fused kernel takes the call).

    python benchmarks/attention_blocks.py --device cpu --out benchmarks/results/cpu/attention_blocks.jsonl
    python benchmarks/attention_blocks.py --device cuda --heads 32 --out benchmarks/results/h100/attention_blocks.jsonl

Memory: the peak bytes of live tensors on the device during the call, beyond its inputs and the output gradient
(memory/livebytes.py, op by op, in real mode; on CUDA also the allocator's peak). Time: the median of `--repeats` calls
after one warm-up. Shapes: batch 1, `--heads` query heads sharing `--kv-heads` key/value heads (Mistral-7B's 32 / 8,
scaled down on the CPU), head size 128, causal, bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portable_kbit.memory.livebytes import LiveTensorBytes  # noqa: E402
from portable_kbit.patches.query_blocks import block_rows, query_block_attention  # noqa: E402

PATHS = ("fused", "math", "query blocks")


def call(path: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if path == "query blocks":
        return query_block_attention(query, key, value, is_causal=True)
    kernels = [SDPBackend.MATH] if path == "math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(kernels):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)


def measure(path: str, length: int, heads: int, kv_heads: int, device: torch.device, repeats: int) -> dict[str, Any]:
    shape = (1, heads, length, 128)
    query = torch.randn(shape, dtype=torch.bfloat16, device=device, requires_grad=True)
    key = torch.randn((1, kv_heads, length, 128), dtype=torch.bfloat16, device=device, requires_grad=True)
    value = torch.randn((1, kv_heads, length, 128), dtype=torch.bfloat16, device=device, requires_grad=True)
    grad = torch.randn(shape, dtype=torch.bfloat16, device=device)

    def step() -> None:
        call(path, query, key, value).backward(grad)
        for tensor in (query, key, value):
            tensor.grad = None

    step()  # warm-up
    tracker = LiveTensorBytes(device)
    for tensor in (query, key, value, grad):
        tracker.adopt(tensor)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with tracker:
        step()
    record: dict[str, Any] = {
        "path": path,
        "seq_len": length,
        "heads": heads,
        "kv_heads": kv_heads,
        "rows": block_rows(query, key) if path == "query blocks" else None,
        "live_tensor_mib": round((tracker.peak_bytes - tracker.static_bytes) / (1 << 20), 1),
        "query_mib": round(query.numel() * query.element_size() / (1 << 20), 1),
    }
    if device.type == "cuda":
        record["allocator_peak_mib"] = round((torch.cuda.max_memory_allocated(device) - before) / (1 << 20), 1)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    record["seconds"] = round(statistics.median(seconds), 4)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: a quarter of --heads")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    kv_heads = args.kv_heads or max(1, args.heads // 4)
    versions = {
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    records = []
    for length in map(int, args.lengths.split(",")):
        for path in args.paths.split(","):
            record = {**measure(path, length, args.heads, kv_heads, device, args.repeats), **versions}
            record["date"] = time.strftime("%Y-%m-%d")
            print(json.dumps(record), flush=True)
            records.append(record)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    fused = {r["seq_len"]: r for r in records if r["path"] == "fused"}
    for r in records:
        base = fused.get(r["seq_len"])
        ratio = f"{r['live_tensor_mib'] / base['live_tensor_mib']:.2f}x the fused kernel's" if base else ""
        print(f"{r['seq_len']:>6} {r['path']:<13} {r['live_tensor_mib']:>9.1f} MiB {ratio:<24} {r['seconds']:.3f} s")


if __name__ == "__main__":
    main()
