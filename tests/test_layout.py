"""The package's layout keeps its promises (docs/architecture.md): a folder is a layer, a lower layer never imports a
higher one, each module states its one job in its first docstring line and stays under 500 lines, a constant is
defined once, and no docstring points to a file the repository does not have."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "portable_kbit"
#: lowest first; a module may import its own layer and the ones before it
LAYERS = ("base", "backends", "model", "memory", "patches", "pipeline", "tools")
#: modules at the package's top level: the shared constants and errors (the base), and the entry points (anything)
BASE_MODULES = ("constants", "errors")
ENTRY_POINTS = ("__init__", "__main__", "run")
MAX_LINES = 500

MODULES = sorted(PACKAGE.rglob("*.py"))


def dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name inside the package; None for an entry point."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ENTRY_POINTS:
        return None
    if parts[0] in BASE_MODULES:
        return "base"
    assert parts[0] in LAYERS, f"{module}: not in a layer folder ({', '.join(LAYERS[1:])}) nor a base module"
    return parts[0]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import of the package's own modules, function-level imports included."""
    tree = ast.parse(path.read_text())
    package = dotted(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("portable_kbit"):
                continue
            # `from .. import backends` names modules; `from ..x import name` a name in x
            names = [f"{target}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names]
            found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("portable_kbit")]
    return found


def test_every_module_is_in_a_layer():
    for path in MODULES:
        layer_of(dotted(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_lower_layer_imports_a_higher_one(path):
    own = layer_of(dotted(path))
    if own is None:
        return
    for line, target in imported_modules(path):
        if target in ("portable_kbit", "portable_kbit.__version__"):
            continue  # the package's version: the tools print it
        other = layer_of(target)
        if other is None:
            pytest.fail(f"{path.name}:{line} imports the entry point {target}")
        assert LAYERS.index(other) <= LAYERS.index(own), (
            f"{dotted(path)} ({own}) imports {target} ({other}), a higher layer (line {line})"
        )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_states_its_job_and_stays_small(path):
    text = path.read_text()
    docstring = ast.get_docstring(ast.parse(text))
    assert docstring and docstring.strip().splitlines()[0].strip(), f"{path}: no docstring stating the module's job"
    assert len(text.splitlines()) <= MAX_LINES, f"{path}: {len(text.splitlines())} lines (at most {MAX_LINES})"


def test_constants_are_defined_once():
    pattern = re.compile(r"^(MiB|GiB|HALF_DTYPES|_?MISSING|_ABSENT)\s*[:=]", re.MULTILINE)
    definitions = [(dotted(path), m.group(1)) for path in MODULES for m in pattern.finditer(path.read_text())]
    assert sorted(definitions) == [
        ("portable_kbit.constants", "GiB"),
        ("portable_kbit.constants", "HALF_DTYPES"),
        ("portable_kbit.constants", "MISSING"),
        ("portable_kbit.constants", "MiB"),
    ]


def test_no_docstring_points_to_a_missing_file():
    for path in MODULES:
        for reference in re.findall(r"[\w./-]+\.md\b", path.read_text()):
            assert (ROOT / reference).exists(), f"{path} points to {reference}, which the repository does not have"
