"""Other packages use `processors` only through what `processors/__init__.py` exports.

What the worker, the sink and the API share lives in `schemas`; the API, the CLI
and the gateway library may start a worker or a sink and judge events by the
worker's validation, and nothing else of `processors`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import processors

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ("query_api", "deploy", "producers", "schemas")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def test_no_package_outside_processors_imports_its_modules() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for package in OUTSIDE
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, module in _imports(path)
        if module.startswith("processors.")
    ]
    assert offenders == []


def test_schemas_imports_nothing_of_processors() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / "schemas").rglob("*.py"))
        for line, module in _imports(path)
        if module == "processors" or module.startswith("processors.")
    ]
    assert offenders == []


@pytest.mark.parametrize("name", processors.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(processors, name) is not None


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'pipeline_internals'"):
        _ = processors.pipeline_internals  # type: ignore[attr-defined]
