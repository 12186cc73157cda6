"""Console-script runs shared between test files: the README's commands and tests/test_cli.py run the same
`portable-kbit compare` and `portable-kbit fit` once per session (each compare variant is a fresh process: seconds
each on a 2-core CPU)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import tempfile
from pathlib import Path

from portable_kbit.tools import cli

#: in README.md's "Command line" block and checked by tests/test_cli.py: one run serves both
README_COMPARE = (
    "compare",
    "tiny",
    "--variants",
    "none,peft,ours-fp32",
    "--steps",
    "2",
    "--plot",
    "compare.png",
    "--json-out",
    "compare.jsonl",
)


#: in README.md's "Command line" block (and docs/will-it-fit.md) and checked by tests/test_cli.py
README_FIT = (
    "fit",
    "tiny",
    "--quantizer",
    "bnb-nf4",
    "--budget",
    "4MiB",
    "--seq-lens",
    "64,128,256",
    "--plot",
    "fit.png",
    "--json-out",
    "fit.jsonl",
)


@dataclasses.dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str
    workdir: Path


@functools.cache
def run_once(argv: tuple[str, ...]) -> Run:
    """cli.main(argv) in a fresh working directory, once per session per argv; presets cached in that directory."""
    workdir = Path(tempfile.mkdtemp(prefix="portable_kbit_cli_"))
    args = list(argv)
    if args[:1] in (["compare"], ["fit"]) and "--cache-dir" not in args:
        args += ["--cache-dir", str(workdir / "cache")]
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
    finally:
        os.chdir(previous)
    return Run(code, out.getvalue(), err.getvalue(), workdir)
