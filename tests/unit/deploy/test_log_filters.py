"""The library log lines that normal operation produces, shown as INFO (deploy/stack.py)."""

from __future__ import annotations

import logging

import pytest

from deploy.stack import ExpectedRetries, Rebalancing, log_tally_lines


def record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


@pytest.mark.parametrize(
    ("check", "name", "msg", "args"),
    [
        (
            Rebalancing(),
            "aiokafka.consumer.group_coordinator",
            "Heartbeat failed for group %s because it is rebalancing",
            ("tally-worker",),
        ),
        (
            ExpectedRetries(),
            "aiokafka.producer.sender",
            "Got error produce response on topic-partition %s, retrying. Error: %s",
            ("tally.rollups-3", "NotEnoughReplicasError"),
        ),
    ],
)
def test_expected_retries_become_info(
    check: logging.Filter, name: str, msg: str, args: tuple[object, ...]
) -> None:
    line = record(name, logging.WARNING, msg, *args)
    assert check.filter(line)
    assert (line.levelno, line.levelname) == (logging.INFO, "INFO")


@pytest.mark.parametrize("check", [Rebalancing(), ExpectedRetries()])
def test_other_warnings_stay_warnings(check: logging.Filter) -> None:
    line = record(
        "aiokafka", logging.WARNING, "Heartbeat session expired - marking coordinator dead"
    )
    assert check.filter(line)
    assert line.levelno == logging.WARNING


def test_installed_once_on_their_loggers() -> None:
    log_tally_lines()
    log_tally_lines()
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator").filters
    sender = logging.getLogger("aiokafka.producer.sender").filters
    assert [type(f) for f in coordinator].count(Rebalancing) == 1
    assert [type(f) for f in sender].count(ExpectedRetries) == 1
