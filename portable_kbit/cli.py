"""The `portable-kbit` console script (also `python -m portable_kbit`): env, demo, compare."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from . import __version__

DESCRIPTION = "Prepare a quantized LLM for LoRA/QLoRA training without spending memory: tools."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .backends import BackendUnavailableError

    try:
        with _quiet(not args.verbose):
            return args.run(args)
    except (BackendUnavailableError, ValueError, RuntimeError, ImportError) as error:
        print(f"portable-kbit {args.command}: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script (its subcommands: env, demo, compare)."""
    from . import compare

    parser = argparse.ArgumentParser(prog="portable-kbit", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"portable-kbit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{env,demo,compare}")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.add_argument("--verbose", action="store_true", help="keep the libraries' progress bars and warnings")
        return sub

    env = command(
        "env",
        "Backends (available or not and why, unified or not), memory now, versions, and which quantizers work here.",
    )
    env.add_argument("--no-probe", action="store_true", help="do not try the quantizers (they take a few seconds)")
    env.set_defaults(run=run_env)

    demo = command(
        "demo",
        "Quantize a built-in tiny Llama (no download), prepare it, attach LoRA, train a few steps; "
        "print the PrepReport and the losses.",
    )
    demo.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, rocm, mps or cpu")
    demo.add_argument("--steps", type=int, default=5, help="optimizer steps (default 5)")
    demo.add_argument("--quantizer", default=None, help="default: the first that works here (bnb-nf4, quanto-int4)")
    demo.add_argument("--activations", default="fp32", choices=("fp32", "native"), help="prepare(activations=...)")
    demo.set_defaults(run=run_demo)

    comp = command(
        "compare",
        "The same phases (load, prep, LoRA, train) for peft's prepare_model_for_kbit_training "
        "and for portable_kbit.prepare, each variant in a fresh process; JSON lines and a table.",
    )
    comp.add_argument(
        "path_or_preset",
        help=f"a local checkpoint folder or a preset: {', '.join(compare.PRESETS)} "
        "(random bf16 weights built locally and cached)",
    )
    comp.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, rocm, mps or cpu")
    comp.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's; 5)")
    comp.add_argument("--seq-len", type=int, default=None, help="tokens per step (default: the preset's; 512)")
    comp.add_argument(
        "--variants",
        default=",".join(compare.DEFAULT_VARIANTS),
        help=f"comma-separated, from: {', '.join(compare.VARIANTS)} (default: {','.join(compare.DEFAULT_VARIANTS)})",
    )
    comp.add_argument(
        "--quantizer",
        default=None,
        help="default: bnb-nf4 where bitsandbytes is installed, quanto-int4 on MPS or without it",
    )
    comp.add_argument(
        "--memory-fraction",
        type=float,
        default=None,
        help="cap each variant's GPU allocator at this fraction of the device (CUDA/ROCm only)",
    )
    comp.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON lines to FILE")
    comp.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw allocated/reserved per phase for each variant (needs matplotlib)",
    )
    comp.add_argument(
        "--cache-dir",
        default=None,
        help="where presets are saved (default: $PORTABLE_KBIT_CACHE or ~/.cache/portable_kbit)",
    )
    # internal: one variant in this process (what each fresh subprocess runs), or building a preset
    comp.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    comp.add_argument("--targets", default=None, help=argparse.SUPPRESS)
    comp.add_argument("--data-seed", type=int, default=1, help=argparse.SUPPRESS)
    comp.add_argument("--build-preset", action="store_true", help=argparse.SUPPRESS)
    comp.set_defaults(run=run_compare)
    return parser


# ---- env ------------------------------------------------------------------------------------------------------------


def environment(probe: bool = True) -> dict[str, Any]:
    """What `portable-kbit env` reports, as a dict."""
    from . import backends, compare, memory, quantizers

    listed = []
    for name in backends.REGISTRY:
        backend = backends.get(name)
        reason = backend.why_unavailable()
        entry: dict[str, Any] = {
            "name": name,
            "available": reason is None,
            "why_unavailable": reason,
            "unified": None,
            "device": None,
            "memory": None,
        }
        if reason is None:
            target = backends.resolve(name)
            entry["device"] = str(target.device)
            entry["unified"] = backend.is_unified(target.device)
            entry["memory"] = memory.take(target).to_dict()
        listed.append(entry)
    available = [entry for entry in listed if entry["available"]]
    probes = []
    for entry in available if probe else []:
        for quantizer in quantizers.PROBED:
            reason = quantizers.probe(quantizer, entry["device"])
            probes.append(
                {
                    "quantizer": quantizer,
                    "backend": entry["name"],
                    "device": entry["device"],
                    "works": reason is None,
                    "why_not": reason,
                }
            )
    default_backend = available[0]["name"]
    try:
        default_quantizer: str | None = (
            next(
                q
                for q in quantizers.preference(default_backend)
                if any(p["quantizer"] == q and p["backend"] == default_backend and p["works"] for p in probes)
            )
            if probe
            else quantizers.choose(default_backend)
        )
    except (StopIteration, RuntimeError):
        default_quantizer = None
    return {
        "portable_kbit": __version__,
        "versions": compare.versions(),
        "backends": listed,
        "quantizers": probes,
        "default": {"backend": default_backend, "quantizer": default_quantizer},
    }


def run_env(args: argparse.Namespace) -> int:
    """`portable-kbit env`: print environment() as text or JSON."""
    info = environment(probe=not args.no_probe)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    versions = info["versions"]
    print(" | ".join(f"{name} {version or 'not installed'}" for name, version in versions.items()))
    print("backends:")
    for entry in info["backends"]:
        if not entry["available"]:
            print(f"  {entry['name']:<5} unavailable: {entry['why_unavailable']}")
            continue
        print(
            f"  {entry['name']:<5} available on {entry['device']}, "
            f"{'unified memory' if entry['unified'] else 'discrete memory'}; {_memory_line(entry['memory'])}"
        )
    if info["quantizers"]:
        print("quantizers (a 64x64 layer quantized, forward and backward):")
        for result in info["quantizers"]:
            verdict = "works" if result["works"] else f"does not work: {result['why_not']}"
            print(f"  {result['quantizer']:<14} on {result['device']:<7} {verdict}")
    default = info["default"]
    print(f"default: {default['backend']} with {default['quantizer'] or 'no working quantizer'}")
    return 0


def _memory_line(snap: dict[str, Any]) -> str:
    def mib(field: str) -> str:
        value = snap.get(field)
        return "n/a" if value is None else f"{value / (1 << 20):,.0f} MiB"

    return (
        f"allocated {mib('allocated')}, reserved {mib('reserved')}, device free {mib('device_free')} of "
        f"{mib('device_total')}, host available {mib('host_available')} of {mib('host_total')}, "
        f"process RSS {mib('process_rss')}"
    )


# ---- demo -----------------------------------------------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> int:
    """`portable-kbit demo`: run portable_kbit.demo.run() and print the report and the losses; 1 if a loss is not
    finite."""
    from . import demo

    result = demo.run(args.device, steps=args.steps, quantizer=args.quantizer, activations=args.activations)
    prep_report = result["report"]
    if args.json:
        print(
            json.dumps(
                {
                    "device": result["device"],
                    "backend": result["backend"],
                    "quantizer": result["quantizer"],
                    "losses": result["losses"],
                    "seconds": round(result["seconds"], 3),
                    "report": prep_report.to_dict(),
                },
                indent=2,
            )
        )
    else:
        print(f"demo: tiny Llama quantized with {result['quantizer']} on {result['device']}")
        print(prep_report.summary())
        print("LoRA training losses: " + " ".join(f"{loss:.4f}" for loss in result["losses"]))
        print(f"done in {result['seconds']:.1f} s")
    finite = all(math.isfinite(loss) for loss in result["losses"])
    return 0 if finite else 1


# ---- compare --------------------------------------------------------------------------------------------------------


def run_compare(args: argparse.Namespace) -> int:
    """`portable-kbit compare`: every variant in a fresh process, JSON lines, a table, a plot; internally also one
    variant in this process (--variant) or building a preset (--build-preset)."""
    from . import compare

    if args.build_preset:
        print(compare.build_preset(args.path_or_preset, args.cache_dir, device=args.device))
        return 0
    if args.variant is not None:  # one variant in this (fresh) process: JSON lines on stdout

        def emit_line(record: dict) -> None:
            print(json.dumps(record), flush=True)

        targets = args.targets.split(",") if args.targets else None
        records = compare.run_variant(
            args.path_or_preset,
            args.variant,
            args.device,
            args.steps or 5,
            args.seq_len or 512,
            args.quantizer,
            targets=targets,
            memory_fraction=args.memory_fraction,
            emit=emit_line,
            data_seed=args.data_seed,
        )
        return 1 if any("error" in r for r in records) else 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so before minutes of measuring
        raise ImportError("--plot needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)")
    out = open(args.json_out, "w") if args.json_out else None

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    try:
        records = compare.compare(
            args.path_or_preset,
            args.device,
            args.steps,
            args.seq_len,
            variants,
            args.quantizer,
            args.memory_fraction,
            args.cache_dir,
            emit,
        )
    finally:
        if out is not None:
            out.close()
    if not args.json:
        print()
        print(compare.table(records))
    if args.plot:
        compare.plot(records, args.plot)
        if not args.json:
            print(f"plot: {args.plot}")
    return 0 if records else 1


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """No progress bars, library warnings or bitsandbytes' import-time notices on the console (--verbose keeps
    them); everything is put back afterwards, so main() can be called in-process."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # import-time notices: bitsandbytes' optional CPU kernels, torchao's optional extensions
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
