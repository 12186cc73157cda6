"""A real out-of-memory in the middle of prepare()'s cast chunks: the model comes back bit for bit, the error says what
happened, and a second prepare() succeeds once the memory is there again.

On a GPU (the Mistral-7B preset, `upcast="peft"`: embed_tokens, the norms and lm_head cast to fp32 in chunks):
the allocator is capped with `torch.cuda.set_per_process_memory_fraction` at what the model holds plus twice what
the casts need, so prepare()'s headroom check passes; right before the largest chunk after the first, a ballast
tensor takes all but half of what that chunk needs under the cap, and the cast runs out of memory for real. The whole
model state (every parameter's and buffer's bits, dtype, device, requires_grad; every hook; training and
checkpointing flags; the config: tests/model_state.py) is compared with a snapshot taken before the call. Then the
ballast is freed and prepare() runs again under the same cap.

On a CPU (the tiny preset) the same chunk raises an injected torch.OutOfMemoryError instead.

    python benchmarks/oom_midprepare.py --device cuda --out benchmarks/results/h100/oom_midprepare.json  # mistral-7b
    python benchmarks/oom_midprepare.py --device cpu --out benchmarks/results/cpu/oom_midprepare.json   # tiny
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def _model_state() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    import model_state

    return model_state


@contextlib.contextmanager
def out_of_memory_at_chunk(
    k: int, chunk_new_bytes: int, device: Any, cap: int | None, record: dict[str, Any]
) -> Iterator[None]:
    """Right before prepare()'s k-th cast chunk: on CUDA, a ballast that leaves half of what the chunk needs under
    the allocator's cap of `cap` bytes (the cast then fails in the allocator); elsewhere an injected
    torch.OutOfMemoryError."""
    import torch

    from portable_kbit.pipeline.cast import CastJournal

    original = CastJournal.apply
    calls = {"n": 0}
    ballast: list[torch.Tensor] = []

    def apply(self: CastJournal, chunk: list, before_each: Any = None) -> None:
        index = calls["n"]
        calls["n"] += 1
        if index == k:
            record["chunks_done_before_the_failure"] = index
            record["casts_done_before_the_failure"] = len(self.done)
            if device.type == "cuda" and cap is not None:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()  # cached free blocks would serve the cast below the cap
                left = cap - torch.cuda.memory_reserved(device)
                size = max(0, (left - chunk_new_bytes // 2) // (2 * MiB) * (2 * MiB))
                ballast.append(torch.empty(size, dtype=torch.uint8, device=device))
                record["ballast_bytes"] = size
                record["free_under_cap_after_ballast"] = cap - torch.cuda.memory_reserved(device)
            else:
                raise torch.OutOfMemoryError(
                    f"out of memory (injected on {device.type}: stands in for the allocator's error at chunk {k})"
                )
        original(self, chunk, before_each)

    CastJournal.apply = apply  # type: ignore[method-assign]
    try:
        yield
    finally:
        CastJournal.apply = original  # type: ignore[method-assign]
        ballast.clear()
        record["ballast_freed"] = True


def run(preset: str, device_name: str, cache_dir: str | None, chunk_bytes: int | None) -> dict[str, Any]:
    import torch

    import portable_kbit
    from portable_kbit import backends
    from portable_kbit.pipeline.cast import chunked, required_bytes
    from portable_kbit.pipeline.prepare import planned_changes
    from portable_kbit.tools import compare, tiny

    model_state = _model_state()
    target = backends.resolve(device_name)
    device = target.device
    if device.type == "cuda" and device.index is None:  # torch 2.11's allocator calls want the index
        device = torch.device("cuda", torch.cuda.current_device())
    record: dict[str, Any] = {"preset": preset, "device": str(device), "versions": compare.versions()}
    started = time.perf_counter()
    path = compare.materialize(preset, cache_dir, str(device) if device.type != "cpu" else None)
    model = tiny.load(path, "bnb-nf4", str(device))
    gc.collect()
    record["load_seconds"] = round(time.perf_counter() - started, 2)
    targets = compare.lora_targets(path)

    # the chunks prepare() will cast (the plan changes nothing), and the chunk that will run out of memory
    budget = chunk_bytes or target.backend.chunk_budget(None, target.backend.is_unified(device))
    changes, _ = planned_changes(model, "peft", targets)
    chunks = chunked(changes.casts, budget)
    sizes = [sum(c.new_bytes for c in chunk) for chunk in chunks]
    if len(chunks) < 2:
        raise SystemExit(f"upcast='peft' makes {len(chunks)} chunk(s) of {budget} bytes: pass a smaller --chunk-bytes")
    k = max(range(1, len(chunks)), key=lambda i: sizes[i])
    required = required_bytes(chunks)
    record.update(
        chunk_bytes=budget,
        chunks=[{"casts": len(chunk), "new_bytes": size} for chunk, size in zip(chunks, sizes, strict=True)],
        failing_chunk=k,
        required_bytes=required,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        cap = torch.cuda.memory_reserved(device) + 2 * required + 256 * MiB
        target.backend.set_memory_fraction(device, cap / total)  # torch 2.11 wants the device's index
        record.update(
            cap_bytes=cap,
            memory_fraction=round(cap / total, 6),
            allocated_after_load=torch.cuda.memory_allocated(device),
        )

    before = model_state.take(model)
    options = dict(target_modules=targets, upcast="peft", chunk_bytes=chunk_bytes)
    first: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        with out_of_memory_at_chunk(k, sizes[k], device, record.get("cap_bytes"), first):
            portable_kbit.prepare(model, str(device), **options)
        first["raised"] = None
    except torch.OutOfMemoryError as error:
        first["raised"] = type(error).__name__
        first["message"] = str(error).splitlines()[0][:400]
        first["notes"] = list(getattr(error, "__notes__", []))
    first["seconds"] = round(time.perf_counter() - t0, 3)
    record["first_prepare"] = first

    t0 = time.perf_counter()
    differences = before.diff(model_state.take(model))
    record["state_compare_seconds"] = round(time.perf_counter() - t0, 2)
    record["restored_bit_for_bit"] = not differences
    record["differences"] = differences[:20]
    record["report_after_failure"] = portable_kbit.report(model) is not None
    del before
    gc.collect()

    second: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        portable_kbit.prepare(model, str(device), **options)
        report = portable_kbit.report(model)
        assert report is not None
        second.update(ok=True, upcast=len(report.upcast), chunks=report.chunks, required_bytes=report.required_bytes)
    except Exception as error:  # recorded: the point of the run is to see whether it works
        second.update(ok=False, error=f"{type(error).__name__}: {str(error)[:400]}")
    second["seconds"] = round(time.perf_counter() - t0, 3)
    record["second_prepare"] = second
    if second.get("ok"):  # and the prepared model trains (the cap lifted: this step is not what is measured)
        if device.type == "cuda":
            target.backend.set_memory_fraction(device, 1.0)
        try:
            _, losses = tiny.train_lora(model, targets or [], steps=1, length=64)
            second["loss_after_one_lora_step"] = round(losses[0], 4)
        except Exception as error:
            second["train_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    record["ok"] = bool(
        first.get("raised") == "OutOfMemoryError"
        and any("restored" in note for note in first.get("notes", []))
        and record["restored_bit_for_bit"]
        and not record["report_after_failure"]
        and second.get("ok")
    )
    record["total_seconds"] = round(time.perf_counter() - started, 2)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="portable_kbit.compare preset (default: mistral-7b on a GPU, tiny on a CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", help="where presets are saved (default: portable_kbit.compare's)")
    parser.add_argument(
        "--chunk-bytes", type=int, help="prepare()'s chunk_bytes (default: the backend's; 32 KiB on tiny)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    args = parser.parse_args(argv)

    from portable_kbit import backends

    device = backends.resolve(args.device).device
    preset = args.preset or ("tiny" if device.type == "cpu" else "mistral-7b")
    chunk_bytes = args.chunk_bytes or (32 << 10 if preset == "tiny" else None)
    record = run(preset, str(device), args.cache_dir, chunk_bytes)
    text = json.dumps(record, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
