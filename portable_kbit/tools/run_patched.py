"""``python -m portable_kbit.run [options] script.py [args ...]``: run a script with peft's function patched.

For code you cannot edit: ``patch_peft()`` is applied first, with the options given here as its defaults, then the
script runs as ``__main__`` (``runpy``), with ``sys.argv`` = ``[script.py, args ...]`` and the script's folder first on
``sys.path``, as ``python script.py`` would. ``-m module`` runs a module instead, as ``python -m module`` would. Every
``from peft import prepare_model_for_kbit_training`` in that code then gets the patched function, because nothing has
imported it before.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Any

from ..pipeline import plan
from ..pipeline.patch_peft import patch_peft
from ..pipeline.prepare import ACTIVATIONS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m portable_kbit.run",
        description="Run a Python script (or -m module) with peft.prepare_model_for_kbit_training patched to "
        "portable_kbit.prepare. Options before the script are prepare()'s; everything after it is the script's.",
    )
    p.add_argument("--device", help="prepare()'s device (default: auto, the model's own device)")
    p.add_argument("--activations", choices=ACTIVATIONS, help="prepare()'s activations (default: fp32)")
    p.add_argument("--upcast", choices=plan.POLICIES, help="prepare()'s upcast policy (default: adjacent)")
    p.add_argument(
        "--target-modules",
        help="comma-separated module names where the adapters will go (default: peft's defaults for the model type)",
    )
    p.add_argument("--chunk-bytes", type=int, help="bytes of new fp32 tensors per cast chunk")
    p.add_argument("-m", dest="as_module", action="store_true", help="run SCRIPT as a module, like python -m")
    p.add_argument("script", help="the script to run (a module name with -m)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return p


def defaults_from(args: argparse.Namespace) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for name in ("device", "activations", "upcast", "chunk_bytes"):
        if getattr(args, name) is not None:
            defaults[name] = getattr(args, name)
    if args.target_modules is not None:
        defaults["target_modules"] = [name.strip() for name in args.target_modules.split(",") if name.strip()]
    return defaults


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not args.as_module and not os.path.isfile(args.script):
        raise SystemExit(f"python -m portable_kbit.run: no such file: {args.script!r}")
    patch_peft(**defaults_from(args))
    sys.argv = [args.script, *args.args]
    if args.as_module:
        runpy.run_module(args.script, run_name="__main__", alter_sys=True)
        return
    sys.path[0] = os.path.dirname(os.path.abspath(args.script))  # as `python script.py`: the script's folder first
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
