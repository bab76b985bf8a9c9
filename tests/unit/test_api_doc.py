"""docs/api.md stays true to the code where that is cheap to check.

The page is the user's reference for the public surface, so what it lists must
exist and what exists must be listed: every operation of the OpenAPI document
(with the status codes it answers), every dead-letter reason, every error code,
the shipped plans, and every `tally` command and flag. Links into the page from
code and docs must land on one of its headings.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, get_args
from unittest.mock import MagicMock

import pytest
from fastapi.testclient import TestClient

from deploy.cli import parser
from processors.decode import Reason
from query_api.app import create_app
from query_api.errors import ERROR_CODES
from query_api.plans import DEFAULT_PLANS
from query_api.settings import ApiSettings
from schemas.store import Store

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "api.md"
HTTP_METHODS = ("get", "post", "put", "patch", "delete")
# A row of the "Endpoints" table: | `METHOD /path` | key | success | errors |
ENDPOINT_ROW = re.compile(r"^\| `([A-Z]+) (/\S*)` \| [^|]* \|([^|]*)\|([^|]*)\|$", re.MULTILINE)
# Where links into the page may come from.
LINK_SOURCES = (
    "README.md",
    "processors",
    "producers",
    "query_api",
    "schemas",
    "deploy",
    "benchmarks",
    "native/src",
    "docs",
    "tests",
)
LINK_SUFFIXES = {".py", ".md", ".rs", ".java", ".js", ".html", ".yaml", ".json"}
LINK = re.compile(r"(?:docs/)?api\.md#([A-Za-z0-9_-]+)")


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC_PATH.read_text()


@pytest.fixture(scope="module")
def client() -> TestClient:
    # The store is a mock: building the OpenAPI document and serving /metrics or the
    # dashboard's files never touch it.
    return TestClient(create_app(ApiSettings(), MagicMock(spec=Store)))


def section(doc: str, heading: str) -> str:
    """The text under `## heading`, up to the next `## `."""
    start = doc.index(f"\n## {heading}\n")
    end = doc.find("\n## ", start + 1)
    return doc[start : end if end != -1 else len(doc)]


def codes(cell: str) -> set[str]:
    return set(re.findall(r"\b\d{3}\b", cell))


def documented_endpoints(doc: str) -> dict[tuple[str, str], set[str]]:
    rows = ENDPOINT_ROW.findall(section(doc, "HTTP API"))
    return {(method, path): codes(ok) | codes(errors) for method, path, ok, errors in rows}


def test_every_openapi_operation_is_documented_with_its_status_codes(
    client: TestClient, doc: str
) -> None:
    documented = documented_endpoints(doc)
    spec: dict[str, Any] = client.app.openapi()  # type: ignore[attr-defined]
    operations = {
        (method.upper(), path): set(operation["responses"])
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }
    assert operations, "the app has no operations: the check would pass vacuously"
    for operation, answers in operations.items():
        assert operation in documented, f"{operation} is missing from the Endpoints table"
        assert documented[operation] == answers, (
            f"{operation}: docs/api.md lists {sorted(documented[operation])}, "
            f"the OpenAPI document {sorted(answers)}"
        )
        method, path = operation
        assert f"#### {method} {path}\n" in doc or path in ("/healthz", "/readyz"), (
            f"{operation} has no section of its own"
        )


def test_every_documented_endpoint_exists(client: TestClient, doc: str) -> None:
    spec: dict[str, Any] = client.app.openapi()  # type: ignore[attr-defined]
    for method, path in documented_endpoints(doc):
        if method.lower() in spec["paths"].get(path, {}):
            continue
        # Routes kept out of the OpenAPI document (metrics, the dashboard): ask them.
        answer = client.request(method, path)
        assert answer.status_code not in (404, 405), f"docs/api.md lists {method} {path}"


def test_every_dead_letter_reason_is_documented(doc: str) -> None:
    dlq = section(doc, "Events")
    for reason in get_args(Reason):
        assert f"| `{reason}` |" in dlq, f"DLQ reason {reason} is missing from docs/api.md"


def test_every_error_code_is_documented(doc: str) -> None:
    errors = section(doc, "HTTP API")
    for code in ERROR_CODES:
        assert re.search(rf"^\| \d{{3}} \| `{code}` \|", errors, re.MULTILINE), code


def test_the_shipped_plans_are_documented_as_they_are(doc: str) -> None:
    plans = section(doc, "Plans and accounts")

    def number(value: float) -> str:
        return f"{value:,.0f}" if value == int(value) else str(value)

    for plan in DEFAULT_PLANS.values():
        row = (
            f"| `{plan.name}` | {number(plan.session_hours)} | {number(plan.session_limit)} | "
            f"{plan.session_anchor} | {number(plan.weekly_limit)} | {plan.weekly_anchor} | "
            f"{number(plan.per_minute)} | {number(plan.max_streams)} |"
        )
        assert row in plans, f"plan {plan.name}: expected the row {row}"
    for field in type(next(iter(DEFAULT_PLANS.values()))).model_fields:
        assert f"| `{field}` |" in plans, f"plan field {field} is not described"


def commands(
    node: argparse.ArgumentParser, prefix: str = "tally"
) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command of the CLI, nested ones included, with its parser."""
    found = []
    for action in node._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.append((f"{prefix} {name}", child))
                found.extend(commands(child, f"{prefix} {name}"))
    return found


def test_every_command_and_flag_is_documented(doc: str) -> None:
    cli = section(doc, "Command line")
    found = commands(parser())
    assert len(found) > 10, "the CLI walk found too few commands: the check would be vacuous"
    for name, command in found:
        assert re.search(rf"`{name}[` ]", cli), f"`{name}` is missing from docs/api.md#command-line"
        for action in command._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert re.search(rf"`{flag}[` ]", cli), f"`{name} {flag}` is not documented"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_links_into_the_page_land_on_a_heading(doc: str) -> None:
    anchors = {slug(line.lstrip("#")) for line in doc.splitlines() if line.startswith("#")}
    links: list[tuple[Path, str]] = []
    for source in LINK_SOURCES:
        path = ROOT / source
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.suffix in LINK_SUFFIXES and file.is_file():
                links += [(file, anchor) for anchor in LINK.findall(file.read_text())]
    links += [(DOC_PATH, anchor) for anchor in re.findall(r"\]\(#([A-Za-z0-9_-]+)\)", doc)]
    assert len(links) > 20, "too few links found: the check would be vacuous"
    for file, anchor in links:
        assert anchor in anchors, (
            f"{file.relative_to(ROOT)} links to api.md#{anchor}: no such heading"
        )
