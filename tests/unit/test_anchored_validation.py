"""Validations by regular expression match the whole value: `re.match` with `$`
also accepts a trailing newline, so each of these uses `fullmatch`."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from query_api.keys import prefix_of
from schemas.cluster import valid_cluster
from schemas.events import Rfc3339
from schemas.exceptions import StoreError
from schemas.store import Store

KEY = "tly_0123456789ab_" + "A" * 32


def test_a_key_with_a_trailing_newline_has_no_prefix() -> None:
    assert prefix_of(KEY) == "0123456789ab"
    assert prefix_of(KEY + "\n") is None


def test_a_cluster_name_with_a_trailing_newline_is_refused() -> None:
    assert valid_cluster("tally_cluster")
    assert not valid_cluster("tally_cluster\n")


def test_a_time_with_a_trailing_newline_is_refused() -> None:
    adapter = TypeAdapter(Rfc3339)
    adapter.validate_python("2026-03-29T01:02:03.456Z")
    with pytest.raises(ValidationError):
        adapter.validate_python("2026-03-29T01:02:03.456Z\n")


def test_a_database_name_with_a_trailing_newline_is_refused_before_any_sql() -> None:
    with pytest.raises(StoreError, match="not a plain identifier"):
        Store("chdb:///nonexistent/never-opened", "tally\n")
