"""The fp32 output head's time and error per way of computing it: its bf16 weight upcast block by block and multiplied
in fp32 (IEEE or TF32), or the input's three bf16 parts multiplied by bf16 matmuls that write fp32
(portable_kbit/patches/fp32_compute.py); a plain bf16 matmul of the rounded input for scale.

    python benchmarks/head_matmuls.py --device cuda --out benchmarks/results/h100/runN/head_matmuls.jsonl

One forward and backward (the input's gradient; the weight is frozen) of FrozenLinearInFp32 at the Mistral-7B shape
(hidden 4096, vocabulary 32000) for `--tokens`, row blocks of 64 MiB as prepare() sizes them on a GPU with room; time:
the median of `--repeats` after a warm-up. Error: the largest difference from an fp64 product, relative to the
largest fp64 value, for the logits and for the input's gradient.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from portable_kbit.patches.fp32_compute import FrozenLinearInFp32  # noqa: E402

WAYS = ("fp32", "tf32", "bf16 parts", "bf16")


def step(way: str, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, rows: int):
    leaf = x.detach().requires_grad_()
    if way == "bf16":
        out = torch.nn.functional.linear(leaf.to(torch.bfloat16), weight).float()
    else:
        out = FrozenLinearInFp32.apply(leaf, weight, None, rows, way == "bf16 parts")
    out.backward(grad)
    return out.detach(), leaf.grad


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).abs().max() / reference.abs().max()).item()


def measure(way: str, tokens: int, device: torch.device, repeats: int) -> dict:
    generator = torch.Generator(device).manual_seed(0)
    hidden, vocab = 4096, 32000
    weight = (torch.randn(vocab, hidden, device=device, generator=generator) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, tokens, hidden, device=device, generator=generator)
    grad = torch.randn(1, tokens, vocab, device=device, generator=generator) * 1e-4
    rows = max(1, (64 << 20) // (4 * hidden))
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if way == "tf32" else "ieee"
    try:
        out, grad_x = step(way, x, weight, grad, rows)  # warm-up, and the values compared
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(way, x, weight, grad, rows)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    out_reference = x.double() @ weight.double().t()
    grad_reference = grad.double() @ weight.double()
    return {
        "way": way,
        "tokens": tokens,
        "seconds": statistics.median(times),
        "logits_error": relative_error(out, out_reference),
        "grad_error": relative_error(grad_x, grad_reference),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", default="4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        for tokens in (int(t) for t in args.tokens.split(",")):
            for way in WAYS:
                row = measure(way, tokens, device, args.repeats)
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
