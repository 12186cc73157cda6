"""The `portable-kbit` console script (also `python -m portable_kbit`): env, demo, compare, fit."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__

DESCRIPTION = "Prepare a quantized LLM for LoRA/QLoRA training without spending memory: tools."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from ..backends import BackendUnavailableError
    from .quiet import quiet

    try:
        with quiet(not args.verbose):
            return args.run(args)
    except (BackendUnavailableError, ValueError, RuntimeError, ImportError) as error:
        print(f"portable-kbit {args.command}: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script (its subcommands: env, demo, compare, fit)."""
    from ..memory.forecast import DEFAULT_SEQ_LENS
    from ..pipeline.prepare import ACTIVATIONS
    from . import configurations, presets
    from .compare import DEFAULT_VARIANTS, VARIANTS
    from .tiny import QUANTIZERS

    def quantizer_option(sub: argparse.ArgumentParser, default_text: str) -> None:
        sub.add_argument(
            "--quantizer",
            default=None,
            choices=QUANTIZERS,
            metavar="QUANTIZER",
            help=f"one of: {', '.join(QUANTIZERS)} ('none': bf16, not quantized); default: {default_text}",
        )

    parser = argparse.ArgumentParser(prog="portable-kbit", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"portable-kbit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{env,demo,compare,fit}")

    def command(name: str, help_text: str, json_help: str = "machine-readable output") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help=json_help)
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
    quantizer_option(demo, "the first that works here (bnb-nf4, else quanto-int4)")
    demo.add_argument(
        "--activations",
        default="fp32",
        choices=ACTIVATIONS,
        help=f"prepare(activations=...): one of {', '.join(ACTIVATIONS)} (default fp32)",
    )
    demo.set_defaults(run=run_demo)

    comp = command(
        "compare",
        "The same phases (load, prep, LoRA, train) for peft's prepare_model_for_kbit_training "
        "and for portable_kbit.prepare, each variant in a fresh process; a table (the records as JSON lines with "
        "--json or --json-out), and a plot with --plot.",
        "print the JSON lines (one per variant and phase) as they come, instead of the table",
    )
    comp.add_argument(
        "path_or_preset",
        help=f"a local checkpoint folder or a preset: {', '.join(presets.PRESETS)} "
        "(random bf16 weights built locally and cached)",
    )
    comp.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, rocm, mps or cpu")
    comp.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's; 5)")
    comp.add_argument("--seq-len", type=int, default=None, help="tokens per step (default: the preset's; 512)")
    comp.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})",
    )
    quantizer_option(comp, "bnb-nf4 where bitsandbytes is installed, quanto-int4 on MPS or without it")
    comp.add_argument(
        "--memory-fraction",
        type=float,
        default=None,
        help="cap each variant's allocator at this fraction of the device (CUDA, ROCm, MPS)",
    )
    comp.add_argument(
        "--json-out", default=None, metavar="FILE", help="write the JSON lines to FILE (the table is still printed)"
    )
    comp.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw what each phase adds to the loaded model, per variant: allocated and reserved, or process RSS "
        "where the device has no allocator (needs matplotlib)",
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
    comp.add_argument("--task", default="one-sequence", help=argparse.SUPPRESS)  # compare.TASKS
    comp.add_argument("--lr", type=float, default=1e-4, help=argparse.SUPPRESS)
    comp.add_argument("--build-preset", action="store_true", help=argparse.SUPPRESS)
    comp.set_defaults(run=run_compare)

    fit = command(
        "fit",
        "Will it fit? Per configuration (activations mode, token blocks, offloaded checkpoints): load, prepare, LoRA "
        "r16, forecast the training-step peak per sequence length and the longest length under a budget; a table, a "
        "recommendation, a plot, and with --verify real steps in fresh processes.",
        "print the JSON lines (one per forecast and per verified length) instead of the tables",
    )
    fit.add_argument(
        "path_or_preset",
        help=f"a local checkpoint folder or a preset: {', '.join(presets.PRESETS)} (random bf16 weights, cached)",
    )
    fit.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, rocm, mps or cpu")
    quantizer_option(fit, "bnb-nf4 where bitsandbytes is installed, quanto-int4 on MPS or without it")
    fit.add_argument(
        "--activations",
        default=",".join(ACTIVATIONS),
        help=f"comma-separated prepare(activations=...) modes, from: {', '.join(ACTIVATIONS)} (default: all); a "
        "mode may name its configuration in full, e.g. native+blocks+offload",
    )
    fit.add_argument(
        "--token-blocks",
        choices=configurations.CHOICES,
        default="off",
        help="each mode without token blocks (off, the default), with them (on: prepare(token_blocks='auto')), "
        "or both",
    )
    fit.add_argument(
        "--offload",
        choices=configurations.OFFLOAD_CHOICES,
        default="off",
        help="each mode without offloaded checkpoints (off, the default), with them (on: "
        "prepare(offload_checkpoints=True)), both, or auto (both where the device has memory of its own)",
    )
    fit.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="the length to reach: the recommendation is the fastest configuration forecast to fit it (default: "
        "the one that fits the longest)",
    )
    fit.add_argument(
        "--budget",
        default=None,
        help="memory the step may use, e.g. 8GiB, 7.5G, 512MiB or bytes (default: what the device can take now)",
    )
    fit.add_argument(
        "--seq-lens",
        default=",".join(map(str, DEFAULT_SEQ_LENS)),
        help=f"comma-separated lengths to forecast (default {','.join(map(str, DEFAULT_SEQ_LENS))})",
    )
    fit.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    fit.add_argument("--lora-rank", type=int, default=16, help="LoRA r (default 16)")
    fit.add_argument(
        "--lora-targets",
        default=None,
        help="comma-separated module names LoRA wraps, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
        "(unsloth's setting; default: the attention projections)",
    )
    fit.add_argument(
        "--verify",
        action="store_true",
        help="also run real steps at the lengths forecast to fit, each in a fresh process capped at the budget "
        "(memory_guard) where the device can be capped; the tables gain the measured columns",
    )
    fit.add_argument("--plot", default=None, metavar="FILE.png", help="draw predicted peak vs length (matplotlib)")
    fit.add_argument(
        "--json-out", default=None, metavar="FILE", help="write the JSON lines to FILE (the tables are still printed)"
    )
    fit.add_argument(
        "--cache-dir",
        default=None,
        help="where presets are saved (default: $PORTABLE_KBIT_CACHE or ~/.cache/portable_kbit)",
    )
    fit.add_argument("--verify-one", type=int, default=None, help=argparse.SUPPRESS)  # one length, in this process
    fit.set_defaults(run=run_fit)
    return parser


# ---- env ------------------------------------------------------------------------------------------------------------


def environment(probe: bool = True) -> dict[str, Any]:
    """What `portable-kbit env` reports, as a dict."""
    from .. import backends
    from ..memory import snapshots
    from . import presets
    from . import quantizer_probe as quantizers

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
            entry["memory"] = snapshots.take(target).to_dict()
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
        "versions": presets.versions(),
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
    """`portable-kbit demo`: run portable_kbit.tools.demo.run() and print the report and the losses; 1 if a loss is not
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
    from . import compare, compare_view, presets

    if args.build_preset:
        print(presets.build_preset(args.path_or_preset, args.cache_dir, device=args.device))
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
            task=args.task,
            lr=args.lr,
        )
        return 1 if any("error" in r for r in records) else 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so before minutes of measuring
        raise ImportError("--plot needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)")
    out = open(args.json_out, "w") if args.json_out else None
    progress = compare_view.Progress(len(variants))

    def emit(record: dict) -> None:
        line = json.dumps(record)
        if args.json:  # machine-readable stdout: the JSON lines, as they come
            print(line, flush=True)
        else:
            progress.seen(record)
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
            verbose=args.verbose,
        )
    finally:
        if out is not None:
            out.close()
    if not args.json:
        print(compare_view.table(records))
    if args.plot:
        compare_view.plot(records, args.plot)
        if not args.json:
            print(f"plot: {args.plot}")
    if args.json_out and not args.json:
        print(f"JSON lines: {args.json_out}")
    return 0 if records else 1


def run_fit(args: argparse.Namespace) -> int:
    """`portable-kbit fit` (tools/fit_command.py)."""
    from .fit_command import run_fit as run

    return run(args)
