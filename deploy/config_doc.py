"""Print the configuration table of docs/configuration.md from the settings classes.

`python -m deploy.config_doc` prints the table (`make docs` writes it into the page);
a unit test keeps the page's copy identical, so the documented variables and defaults
cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

from deploy.settings import REPO_ROOT, StackSettings
from processors import WorkerSettings
from producers.settings import EnforcementSettings, ProducerSettings
from query_api.alerts.settings import AlertSettings
from query_api.settings import ApiSettings
from schemas.settings import TallySettings

SECTIONS: list[tuple[str, type[BaseSettings]]] = [
    ("every service", TallySettings),
    ("worker (`tally worker`)", WorkerSettings),
    ("API (`tally api`)", ApiSettings),
    ("`tally up`", StackSettings),
    ("alerts and webhooks (`tally up`, `tally sink`, the API)", AlertSettings),
    ("gateway library and `tally loadgen`", ProducerSettings),
    ("gateway middleware enforcement", EnforcementSettings),
]


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Path):
        try:
            return f"`{value.relative_to(REPO_ROOT)}`"
        except ValueError:
            return f"`{value}`"
    return f"`{value}`"


def table() -> str:
    lines = ["| variable | used by | default | meaning |", "|---|---|---|---|"]
    seen: set[str] = set()
    for section, cls in SECTIONS:
        for name, field in cls.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            lines.append(
                f"| `TALLY_{name.upper()}` | {section} | {_default(field.default)} "
                f"| {field.description or ''} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
