"""The JSON Schemas in `schemas/`, generated from the Structs (never written by hand).

One file per event type and schema version (old versions from `codec.OLD_SHAPES` included, so
a reader of old logs finds their shape), one for the union of current events, and one each for
`JobSpec`, the status view `JobView` and a line of an exported history (`HistoryLine`).
`flowactors schemas` writes them; `flowactors schemas --check` (and a test) fails when the
committed files differ from the code.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import msgspec

from .codec import OLD_SHAPES
from .events import EVENT_TYPES, JobEvent, event_tag
from .history import HistoryLine
from .spec import JobSpec
from .views import JobView

SOURCE_DIR = Path(__file__).resolve().parents[1] / "schemas"
"""`schemas/` of the source tree this package was imported from."""


def _render(schema: dict[str, Any]) -> bytes:
    return msgspec.json.format(
        msgspec.json.encode(_normalised(schema), order="sorted"), indent=2) + b"\n"


def _normalised(node: Any) -> Any:
    """`node` with every description cleaned like `inspect.cleandoc`: msgspec releases differ
    in how they indent a docstring, and the committed files must not depend on that."""
    if isinstance(node, dict):
        return {key: inspect.cleandoc(value) if key == "description" and isinstance(value, str)
                else _normalised(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_normalised(item) for item in node]
    return node


def _with_version(schema: dict[str, Any], version: int) -> dict[str, Any]:
    return {**schema, "x-schema-version": version}


def generate() -> dict[str, bytes]:
    """Every schema file: name -> content."""
    files: dict[str, bytes] = {}
    for cls in EVENT_TYPES:
        tag, version = event_tag(cls), cls.schema_version
        files[f"{tag}.v{version}.json"] = _render(
            _with_version(msgspec.json.schema(cls), version))
    for (tag, version), shape in OLD_SHAPES.items():
        files[f"{tag}.v{version}.json"] = _render(
            _with_version(msgspec.json.schema(shape), version))
    files["JobEvent.json"] = _render(msgspec.json.schema(JobEvent))
    for cls in (JobSpec, JobView, HistoryLine):
        files[f"{cls.__name__}.json"] = _render(msgspec.json.schema(cls))
    return dict(sorted(files.items()))


def differences(directory: Path) -> list[str]:
    """What differs between `directory` and the generated schemas, one line each (empty:
    identical)."""
    wanted = generate()
    present = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    problems = []
    for name, content in wanted.items():
        if name not in present:
            problems.append(f"{name}: missing")
        elif (directory / name).read_bytes() != content:
            problems.append(f"{name}: differs from the code")
    problems += [f"{name}: no such schema in the code (stale file)"
                 for name in sorted(present - wanted.keys())]
    return problems


def write(directory: Path) -> list[str]:
    """Write every schema into `directory` and remove stale ones; return the changed names."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = generate()
    changed = []
    for name, content in wanted.items():
        target = directory / name
        if not target.exists() or target.read_bytes() != content:
            target.write_bytes(content)
            changed.append(name)
    for stale in sorted(p for p in directory.glob("*.json") if p.name not in wanted):
        stale.unlink()
        changed.append(stale.name)
    return changed
