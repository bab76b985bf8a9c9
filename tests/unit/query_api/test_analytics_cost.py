"""Bounds and charges of analytics queries (query_api/analytics_cost.py)."""

from __future__ import annotations

from typing import Any

import pytest

from query_api.analytics_cost import NARROWER, QueryBounds, run
from query_api.errors import ApiError
from query_api.settings import ApiSettings

BOUNDS = QueryBounds(max_rows=100, max_seconds=2.5, rows_per_token=10)


def test_rows_up_to_the_bound_pass_and_one_more_is_a_422_saying_how_to_narrow() -> None:
    BOUNDS.check_rows(100)
    with pytest.raises(ApiError) as refused:
        BOUNDS.check_rows(101)
    assert (refused.value.status, refused.value.code) == (422, "validation_error")
    assert "more than 100 rows" in refused.value.message
    assert "TALLY_ANALYTICS_MAX_ROWS" in refused.value.message
    assert NARROWER in refused.value.message


@pytest.mark.parametrize(("rows", "extra"), [(0, 0), (9, 0), (10, 1), (99, 9), (100, 10)])
def test_bigger_answers_cost_more_tokens(rows: int, extra: int) -> None:
    assert BOUNDS.extra_tokens(rows) == extra


def test_the_settings_clause_bounds_time_and_rows_on_the_server() -> None:
    assert BOUNDS.settings_clause(101) == (
        " SETTINGS max_execution_time = 2.500, max_result_rows = 101, "
        "result_overflow_mode = 'throw', output_format_json_escape_forward_slashes = 0"
    )


def test_bounds_come_from_the_settings() -> None:
    settings = ApiSettings(
        analytics_max_rows=7, analytics_max_seconds=0.25, analytics_rows_per_token=3
    )
    assert QueryBounds.of(settings) == QueryBounds(7, 0.25, 3)
    defaults = QueryBounds.of(ApiSettings())
    assert defaults == QueryBounds(10_000, 5.0, 100)


class FailingStore:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.sql = ""

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        self.sql = sql
        raise self.error


def test_a_query_stopped_for_time_is_a_422() -> None:
    store: Any = FailingStore(
        RuntimeError(
            "Code: 159. DB::Exception: Timeout exceeded: elapsed 2.8 ms (TIMEOUT_EXCEEDED)"
        )
    )
    with pytest.raises(ApiError) as refused:
        run(store, "SELECT 1 LIMIT 5", {}, BOUNDS, 5)
    assert refused.value.status == 422
    assert "ran longer than 2.5s" in refused.value.message
    assert NARROWER in refused.value.message
    assert store.sql.startswith("SELECT 1 LIMIT 5 SETTINGS max_execution_time = 2.500")


def test_other_store_failures_are_not_disguised() -> None:
    store: Any = FailingStore(ConnectionError("store unreachable"))
    with pytest.raises(ConnectionError):
        run(store, "SELECT 1", {}, BOUNDS, 1)
