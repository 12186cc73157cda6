"""The `portable-kbit fit` command: a forecast per configuration, a table, a summary over configurations, a
recommendation, a plot; with --verify, real steps at the lengths that fit, each in a fresh process."""

from __future__ import annotations

import argparse
import importlib.util
import json


def run_fit(args: argparse.Namespace) -> int:
    """`portable-kbit fit`: a forecast per configuration (in this process, one after another), a table, a plot;
    with --verify, real steps at the lengths that fit, each in a fresh process. Internally (--verify-one) one real
    step in this process. Every argument is checked before anything loads."""
    from .. import backends
    from . import configurations, fit, presets

    modes = fit.activation_modes(args.activations)
    notes: list[str] = []
    if args.verify_one is None:
        target = backends.resolve(args.device)
        why_no_offload = target.backend.why_no_offload(target.device)
        chosen, notes = configurations.expand(modes, args.token_blocks, args.offload, why_no_offload)
        modes = [c.name for c in chosen]
    lengths = fit.parse_lengths(args.seq_lens)
    if args.seq_len is not None and args.seq_len <= 0:
        raise ValueError(f"--seq-len must be a positive int, not {args.seq_len}")
    budget = fit.parse_bytes(args.budget) if args.budget is not None else None
    for name, value in (("--batch-size", args.batch_size), ("--lora-rank", args.lora_rank)):
        if value <= 0:
            raise ValueError(f"{name} must be a positive int, not {value}")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    if args.lora_targets is not None and not targets:
        raise ValueError(f"--lora-targets names no module: {args.lora_targets!r} (e.g. q_proj,v_proj)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so before minutes of measuring
        raise ImportError("--plot needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)")
    if args.verify_one is not None:  # one real step in this (fresh) process: one JSON line on stdout
        record = fit.verify_length(
            args.path_or_preset,
            modes[0],
            args.verify_one,
            args.device,
            args.quantizer,
            args.batch_size,
            budget,
            args.lora_rank,
            targets,
        )
        print(json.dumps(record), flush=True)
        return 0
    path = presets.materialize(args.path_or_preset, args.cache_dir, args.device)
    out = open(args.json_out, "w") if args.json_out else None
    records: list[dict] = []

    def emit(record: dict) -> None:
        records.append(record)
        line = json.dumps(record)
        if args.json:
            print(line, flush=True)
        if out is not None:
            out.write(line + "\n")
            out.flush()

    try:
        for mode in modes:
            forecast_record = fit.forecast_mode(
                path, mode, args.device, args.quantizer, lengths, args.batch_size, budget, args.lora_rank, targets
            )
            emit(forecast_record)
            if not args.verify:
                continue
            for seq_len in fit.verify_lengths(forecast_record):
                emit(
                    fit.verify_in_subprocess(
                        path,
                        mode,
                        seq_len,
                        args.device,
                        forecast_record["quantizer"],
                        args.batch_size,
                        forecast_record["budget_bytes"],
                        args.lora_rank,
                        targets,
                        verbose=args.verbose,
                    )
                )
        recommendation = configurations.recommend(records, args.seq_len)
        if recommendation is not None:
            emit(recommendation)
    finally:
        if out is not None:
            out.close()
    if not args.json:
        print(fit.table(records, verify=args.verify))
        if len(modes) > 1:
            print("\n" + configurations.summary(records))
        for note in notes:
            print(f"note: {note}")
        print("\n" + configurations.line(recommendation, args.seq_len))
    if args.plot:
        fit.plot(records, args.plot)
        if not args.json:
            print(f"plot: {args.plot}")
    if args.json_out and not args.json:
        print(f"JSON lines: {args.json_out}")
    failed = [r for r in records if r.get("kind") == "verify" and not r.get("fits")]
    return 1 if failed else 0
