"""Every code block in README.md: the CPU-runnable ones run here; GPU- and Mac-only ones are marked and skipped.

A block is skipped when an HTML comment `<!-- no-test: REASON -->` stands right before it. In bash blocks, `pip
install` commands are installation (CI does it in .ci/run before the tests), `python -m pytest` is this very run, and
every `portable-kbit ...` / `python -m portable_kbit ...` command runs through portable_kbit.tools.cli.main; any other
command fails the test, so that the README cannot show a command nobody runs.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(
    r"(?:<!--\s*no-test:\s*(?P<reason>.*?)\s*-->[ \t]*\n\s*)?^```(?P<lang>python|bash)[ \t]*\n(?P<code>.*?)^```",
    re.S | re.M,
)
SETUP_COMMANDS = [
    'pip install -e ".[demo]" && python -m portable_kbit demo',
    'pip install -e ".[test]" && python -m pytest -q',
]


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int
    reason: str | None

    @property
    def id(self) -> str:
        return f"{self.lang}-line{self.line}"


def blocks(lang: str | None = None) -> list[Block]:
    text = README.read_text()
    found = [
        Block(m["lang"], m["code"], text.count("\n", 0, m.start("code")), m["reason"]) for m in BLOCK.finditer(text)
    ]
    return [b for b in found if lang is None or b.lang == lang]


def commands(code: str) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, comments dropped, split on &&."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


def test_top_of_the_readme_is_the_two_setup_commands_then_the_short_example():
    first = blocks()[:3]
    assert [b.lang for b in first] == ["bash", "bash", "python"]
    assert [b.code.strip() for b in first[:2]] == SETUP_COMMANDS
    assert "portable_kbit.prepare(model" in first[2].code and all(b.reason is None for b in first)
    text = README.read_text()
    assert text.index("<!-- benchmark-table:start -->") < text.index("<!-- benchmark-table:end -->")


def test_the_readme_test_command_is_what_ci_runs():
    readme_command = blocks("bash")[1].code.strip()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci_lines, ".ci/run runs no pytest"
    for command in (readme_command, ci_lines[-1]):
        assert "pip install" in command and '-e ".[test]"' in command and "pytest" in command


def test_the_readme_check_command_is_what_ci_runs():
    block = next(b for b in blocks("bash") if "mypy" in b.code)
    checks = commands(block.code)
    assert {"ruff check .", "ruff format --check .", "mypy"} <= set(checks)
    ci_checks = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "mypy" in line]
    assert ci_checks, ".ci/run runs no mypy"
    assert [c for c in checks if not c.startswith("pip install")] == commands(ci_checks[-1])


def test_every_skipped_block_says_why():
    for block in blocks():
        assert block.reason is None or len(block.reason) > 5, block.id


@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.id)
def test_python_block_runs(block, tmp_path, monkeypatch):
    if block.reason:
        pytest.skip(f"README.md line {block.line}: {block.reason}")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    code = block.code
    if "model = portable_kbit.prepare(model" in code and "from_pretrained" not in code and "tiny.load" not in code:
        # The short example at the top prepares a `model` it does not define, on a Mac: give it a tiny quantized model
        # and this machine's first device (a bitsandbytes model is loaded where it is prepared; on MPS an
        # optimum-quanto model is loaded on the CPU and prepare() moves it).
        from portable_kbit import backends
        from portable_kbit.tools import quantizer_probe as quantizers
        from portable_kbit.tools import tiny

        target = backends.resolve("auto")
        if target.backend.name == "mps":
            namespace["model"] = tiny.load(tiny.checkpoint("llama"), "quanto-int4", "cpu")
        else:
            code = code.replace('device="mps"', f'device="{target.device}"')
            quantizer = quantizers.choose(target.backend.name)
            namespace["model"] = tiny.load(tiny.checkpoint("llama"), quantizer, str(target.device))
    exec(compile(code, f"README.md:{block.line}", "exec"), namespace)


@pytest.mark.parametrize("block", blocks("bash"), ids=lambda b: b.id)
def test_bash_block_runs(block):
    if block.reason:
        pytest.skip(f"README.md line {block.line}: {block.reason}")
    from shared_runs import run_once

    ran = 0
    for command in commands(block.code):
        argv = shlex.split(command)
        if argv[:2] == ["pip", "install"] or argv[:4] == ["python", "-m", "pip", "install"]:
            continue  # installation: .ci/run installs the project and its test extra before the tests
        if argv[:3] == ["python", "-m", "pytest"]:
            continue  # the test run itself
        if argv[:1] == ["portable-kbit"]:
            args = argv[1:]
        elif argv[:3] == ["python", "-m", "portable_kbit"]:
            args = argv[3:]
        else:
            pytest.fail(
                f"README.md line {block.line}: no test runs {command!r}; mark the block no-test or run it here"
            )
        run = run_once(tuple(args))  # tests/test_cli.py checks the outputs of the README's compare command
        assert run.code == 0, f"{command}: exit {run.code}\n{run.err[-2000:]}"
        assert run.out.strip(), f"{command}: printed nothing"
        ran += 1
    if not ran:
        pytest.skip(f"README.md line {block.line}: installation and the test run itself, done by .ci/run")
