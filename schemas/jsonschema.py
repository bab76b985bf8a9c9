"""Generate `schemas/event.schema.json`, for gateways written in other languages.

`make schema` rewrites the file; a unit test fails when it drifts from the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.events import MESSAGE_ADAPTER

SCHEMA_PATH = Path(__file__).parent / "event.schema.json"


def message_schema() -> dict[str, Any]:
    schema = MESSAGE_ADAPTER.json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://tally.dev/schemas/event.schema.json",
        "title": "Tally message: one CloudEvent or a JSON array of them",
        "description": (
            "Value of a record on the tally.events topic (docs/api.md#events). Times must also be "
            "within 5 minutes ahead and the lateness bound (35 days) behind, checked at "
            "ingestion. Key single events by `subject`."
        ),
        **schema,
    }


def render() -> str:
    return json.dumps(message_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
