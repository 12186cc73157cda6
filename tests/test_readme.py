"""Every code block in README.md and docs/*.md: the CPU-runnable ones run here; GPU- and Mac-only ones are marked and
skipped. Every relative link in those pages points to a file (and heading) that exists.

A block is skipped when an HTML comment `<!-- no-test: REASON -->` stands right before it. In bash blocks, `pip
install` commands are installation (CI does it in .ci/run before the tests), `python -m pytest` is this very run, and
every `portable-kbit ...` / `python -m portable_kbit ...` command runs through portable_kbit.tools.cli.main; any other
command fails the test, so that no page can show a command nobody runs. Python blocks run as written, each in a fresh
namespace and an empty working directory: a block cannot lean on a name another block defined.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 300  # issue 24: the README is the newcomer's page; the rest lives in docs/
BLOCK = re.compile(
    r"(?:<!--\s*no-test:\s*(?P<reason>.*?)\s*-->[ \t]*\n\s*)?^```(?P<lang>python|bash)[ \t]*\n(?P<code>.*?)^```",
    re.S | re.M,
)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
SETUP_COMMANDS = [
    'pip install -e ".[demo]" && python -m portable_kbit demo',
    'pip install -e ".[test]" && python -m pytest -q',
]
#: generated tables: the page each lives in, its markers, and the script (with its command) that rewrites it
GENERATED_TABLES = [
    (
        DOCS / "benchmarks.md",
        ("<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"),
        ROOT / "benchmarks" / "table.py",
        "--write docs/benchmarks.md",
    ),
    (
        DOCS / "architectures.md",
        ("<!-- architectures-table:start -->", "<!-- architectures-table:end -->"),
        ROOT / "benchmarks" / "architectures.py",
        "--write docs/architectures.md",
    ),
]


@dataclasses.dataclass
class Block:
    page: Path
    lang: str
    code: str
    line: int
    reason: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)} line {self.line}"

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}-{self.lang}-line{self.line}"


def blocks(lang: str | None = None, pages: list[Path] = PAGES) -> list[Block]:
    found = []
    for page in pages:
        text = page.read_text()
        found += [
            Block(page, m["lang"], m["code"], text.count("\n", 0, m.start("code")), m["reason"])
            for m in BLOCK.finditer(text)
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


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes for a page: lower case, punctuation dropped, spaces to hyphens, -N repeats."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        if not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))  # links inside code are not links
    return [m["target"] for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m["target"])]


def test_top_of_the_readme_is_the_two_setup_commands_then_the_short_example():
    first = blocks(pages=[README])[:3]
    assert [b.lang for b in first] == ["bash", "bash", "python"]
    assert [b.code.strip() for b in first[:2]] == SETUP_COMMANDS
    assert "portable_kbit.prepare(model" in first[2].code and all(b.reason is None for b in first)


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move the details into docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in relative_links(README)}
    assert not [page.name for page in PAGES[1:] if page.resolve() not in linked]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_what_exists(page):
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.relative_to(ROOT)}: {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.relative_to(ROOT)}: {target}: no such heading"


@pytest.mark.parametrize("page, markers, script, command", GENERATED_TABLES, ids=["benchmarks", "architectures"])
def test_generated_tables_are_where_their_scripts_write_them(page, markers, script, command):
    text = page.read_text()
    start, end = markers
    assert text.index(start) < text.index(end)
    assert command in script.read_text(), f"{script.name}'s usage does not say {command!r}"


def test_the_readme_test_command_is_what_ci_runs():
    readme_command = blocks("bash", pages=[README])[1].code.strip()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci_lines, ".ci/run runs no pytest"
    for command in (readme_command, ci_lines[-1]):
        assert "pip install" in command and '-e ".[test]"' in command and "pytest" in command


def test_the_readme_check_command_is_what_ci_runs():
    block = next(b for b in blocks("bash", pages=[README]) if "mypy" in b.code)
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
        pytest.skip(f"{block.where}: {block.reason}")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(block.code, block.where, "exec"), namespace)


@pytest.mark.parametrize("block", blocks("bash"), ids=lambda b: b.id)
def test_bash_block_runs(block):
    if block.reason:
        pytest.skip(f"{block.where}: {block.reason}")
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
            pytest.fail(f"{block.where}: no test runs {command!r}; mark the block no-test or run it here")
        run = run_once(tuple(args))  # tests/test_cli.py checks the outputs of the README's compare and fit commands
        assert run.code == 0, f"{command}: exit {run.code}\n{run.err[-2000:]}"
        assert run.out.strip(), f"{command}: printed nothing"
        ran += 1
    if not ran:
        pytest.skip(f"{block.where}: installation and the test run itself, done by .ci/run")
