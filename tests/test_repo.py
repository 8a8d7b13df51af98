"""The repository's own rules, read from its source: what may import what, and that every
library imported is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("runtime", "sandbox", "scripts", "tests")
# scripts/ is not a package: its modules import each other by bare name (loadlib).
FIRST_PARTY = {"runtime", "sandbox", "tests"} | {p.stem for p in (ROOT / "scripts").glob("*.py")}


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            # `from tests import test_x` names a module too.
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


#: The modules of tests/ that hold no tests: pytest's, and the shared helpers (README, Layout).
HELPERS = {"__init__", "conftest", "helpers", "attack_kit", "confine_kit", "live", "pg_kit"}


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    names = set()
    for requirement in requirements:
        found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert found, requirement
        names.add(normalized(found.group()))
    return names


def cross_imports(path: Path) -> list[str]:
    """Where `path` imports a test module (or conftest) instead of tests/helpers.py."""
    hits: dict[int, str] = {}  # the first per line: `from a import b` reads as a and a.b
    for line, module in imports(path):
        if module.startswith(("tests.test_", "tests.conftest")) or module == "conftest":
            hits.setdefault(line, module)
    return [f"{path.name}:{line} imports {module}" for line, module in hits.items()]


def test_no_test_module_imports_another() -> None:
    # Shared helpers live in tests/helpers.py, fixtures in conftest.py (which pytest loads).
    found = [hit for path in sorted((ROOT / "tests").rglob("*.py")) for hit in cross_imports(path)]
    assert found == []


def test_tests_holds_test_modules_and_the_named_helpers() -> None:
    others = {p.stem for p in (ROOT / "tests").glob("*.py") if not p.stem.startswith("test_")}
    assert others == HELPERS


def test_every_imported_library_is_declared() -> None:
    installed = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing = []
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            for line, module in imports(path):
                name = module.partition(".")[0]
                if name in sys.stdlib_module_names or name in FIRST_PARTY:
                    continue
                # A library not installed here (an extra) is named as its module is.
                distributions = installed.get(name, [name])
                if not any(normalized(d) in declared for d in distributions):
                    missing.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert missing == []


def test_the_checks_see_what_they_must(tmp_path: Path) -> None:
    # The checks above would pass vacuously if the readers found nothing.
    cross = tmp_path / "test_x.py"
    cross.write_text(
        "from tests.test_api import valrun\nfrom tests import test_worker\n"
        "def f():\n    import tests.conftest\n"
    )
    assert cross_imports(cross) == [
        "test_x.py:1 imports tests.test_api",
        "test_x.py:2 imports tests.test_worker",
        "test_x.py:4 imports tests.conftest",
    ]
    modules = {module for _line, module in imports(ROOT / "scripts" / "loadlib.py")}
    assert {"h11", "trio"} <= modules
    assert {"trio", "hypercorn", "restrictedpython", "h11", "pytest"} <= declared_distributions()
