"""The install is reproducible: the package declares what it imports, and the lock pins it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_level_modules() -> set[str]:
    modules = set()
    for path in (ROOT / "flowactors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"flowactors"}


def test_every_third_party_module_the_package_imports_is_declared():
    """A module imported by flowactors comes from a distribution named in its dependencies or
    an extra (click was imported but not declared, working only because sqlite-utils pulls it
    in)."""
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        declared |= {_name(r) for r in extra}
    distributions = importlib.metadata.packages_distributions()
    for module in sorted(_imported_top_level_modules()):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert names & declared, f"{module} is imported but {names} is not declared"


def test_the_lock_pins_every_declared_dependency_to_one_version():
    """`make test` installs with constraints.txt: each dependency and extra of pyproject.toml
    has one exact version there, so a release upstream cannot change what a fresh clone runs."""
    lock = (ROOT / "constraints.txt").read_text().splitlines()
    pins = {_name(line): line.split("==", 1)[1] for line in lock
            if line and not line.startswith("#")}
    wanted = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        wanted |= {_name(r) for r in extra}
    for name in sorted(wanted):
        assert name in pins and re.fullmatch(r"[0-9][0-9A-Za-z.+!]*", pins[name]), name
