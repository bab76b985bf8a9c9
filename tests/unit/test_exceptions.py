"""The exception tree of schemas/exceptions.py: one root, the builtin bases callers catch."""

from __future__ import annotations

import pytest

from deploy.exceptions import AdminCliError, LocalServerError, ReconcileError, TopicSetupError
from processors.exceptions import FencedError, SinkFencedError
from producers.exceptions import (
    FlushTimeoutError,
    GatewaySendError,
    GatewayStartError,
    SpoolError,
    SpoolFullError,
    SpoolLockedError,
)
from query_api.errors import ApiError
from query_api.exceptions import AccountExistsError, PlanConfigError, UnknownAccountError
from schemas.exceptions import ClusterDDLError, OperatorError, StoreError, TallyError


@pytest.mark.parametrize(
    ("error", "bases"),
    [
        (OperatorError, (RuntimeError,)),
        (StoreError, (OperatorError, RuntimeError)),
        (ClusterDDLError, (ValueError,)),
        (GatewaySendError, (RuntimeError,)),
        (GatewayStartError, (OperatorError, RuntimeError)),
        (SpoolError, (RuntimeError,)),
        (SpoolLockedError, (SpoolError,)),
        (SpoolFullError, (SpoolError, RuntimeError)),
        (FlushTimeoutError, (TimeoutError,)),
        (FencedError, ()),
        (SinkFencedError, ()),
        (AccountExistsError, ()),
        (UnknownAccountError, ()),
        (PlanConfigError, (ValueError,)),
        (ApiError, ()),
        (LocalServerError, (OperatorError, RuntimeError)),
        (TopicSetupError, (OperatorError,)),
        (AdminCliError, (OperatorError,)),
        (ReconcileError, (OperatorError,)),
    ],
)
def test_every_error_is_a_tally_error_with_the_bases_callers_catch(
    error: type[Exception], bases: tuple[type[Exception], ...]
) -> None:
    assert issubclass(error, TallyError)
    for base in bases:
        assert issubclass(error, base)


def test_an_operator_error_is_its_message_then_its_hint() -> None:
    error = OperatorError("port 9092 is taken.", "Stop the other broker.")
    assert (error.message, error.hint) == ("port 9092 is taken.", "Stop the other broker.")
    assert str(error) == "port 9092 is taken. Stop the other broker."
    assert str(OperatorError("no hint")) == "no hint"


def test_a_store_error_carries_its_url() -> None:
    error = StoreError("cannot open the store.", "Check TALLY_CLICKHOUSE_URL.", url="chdb:///x")
    assert error.url == "chdb:///x"
    assert error.hint == "Check TALLY_CLICKHOUSE_URL."
