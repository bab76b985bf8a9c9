"""What one analytics query may cost, and what it is charged (pure but for `run`).

An analytics answer costs the store time (the scan) and the API time and memory (a
row per bucket and group, serialised to JSON). Both are bounded per query:

- rows: at most `max_rows` (TALLY_ANALYTICS_MAX_ROWS) buckets x groups; a larger
  result is refused with 422 saying how to narrow the query, never truncated. The
  SQL asks for one row more than that, so the refusal costs no more than the limit;
- time: ClickHouse stops the query after `max_seconds` (max_execution_time,
  TALLY_ANALYTICS_MAX_SECONDS), and `max_result_rows` backs the LIMIT up on the
  server's side; a query stopped for time is a 422 asking for a narrower one.

The caller is charged by size: one request, plus one token of their API rate limit
per `rows_per_token` rows read (TALLY_ANALYTICS_ROWS_PER_TOKEN, default 100), served
or refused, so a caller asking for big answers gets fewer of them per second than
one asking for small ones. The default prices a 10,000-row answer at about one
full burst: building it costs this process ~100-200x the CPU of a usage request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from query_api.errors import ApiError
from query_api.settings import ApiSettings
from schemas.store import Store

NARROWER = "use a coarser window, a shorter range or fewer group_by dimensions"

# ClickHouse's TIMEOUT_EXCEEDED (code 159), as the server and the embedded engine word it.
_TIMEOUT_MARKERS = ("TIMEOUT_EXCEEDED", "Timeout exceeded")


@dataclass(frozen=True, slots=True)
class QueryBounds:
    max_rows: int
    max_seconds: float
    rows_per_token: int

    @classmethod
    def of(cls, settings: ApiSettings) -> QueryBounds:
        return cls(
            settings.analytics_max_rows,
            settings.analytics_max_seconds,
            settings.analytics_rows_per_token,
        )

    def settings_clause(self, limit: int) -> str:
        """The SETTINGS clause for a query with `LIMIT limit`. Inline in the SQL, as
        the embedded engine only honours per-call settings slowly (schemas/store.py)."""
        return (
            f" SETTINGS max_execution_time = {self.max_seconds:.3f}, "
            f"max_result_rows = {int(limit)}, result_overflow_mode = 'throw', "
            # Routes as they are: "/v1/chat", not "\\/v1\\/chat" (both valid JSON).
            "output_format_json_escape_forward_slashes = 0"
        )

    def check_rows(self, rows: int) -> None:
        """422 for a result over `max_rows` (the SQL asked for one more to know)."""
        if rows > self.max_rows:
            raise ApiError(
                422,
                "validation_error",
                f"the result has more than {self.max_rows} rows (buckets x groups; "
                f"TALLY_ANALYTICS_MAX_ROWS): {NARROWER}",
            )

    def extra_tokens(self, rows: int) -> int:
        """Tokens charged beyond the request's own one for an answer of `rows` rows."""
        return rows // self.rows_per_token


def run(
    store: Store, sql: str, parameters: dict[str, Any], bounds: QueryBounds, limit: int
) -> list[tuple[Any, ...]]:
    """`sql` (ending in its LIMIT) under `bounds`; a query stopped for time is a 422.
    Blocking."""
    try:
        return store.query(sql + bounds.settings_clause(limit), parameters)
    except Exception as exc:
        if any(marker in str(exc) for marker in _TIMEOUT_MARKERS):
            raise ApiError(
                422,
                "validation_error",
                f"the query ran longer than {bounds.max_seconds:g}s "
                f"(TALLY_ANALYTICS_MAX_SECONDS): {NARROWER}",
            ) from None
        raise
