from __future__ import annotations

import io
import json
import logging
import logging.config
import sys

import pytest

from schemas import logs


def _record(msg: str = "GET /x 200", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("tally.access", logging.INFO, __file__, 1, msg, None, None)
    record.created = 1_767_225_600.25  # 2026-01-01T00:00:00.250Z
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_the_request_fields() -> None:
    line = logs.JsonFormatter().format(
        _record(
            request_id="abc123",
            method="GET",
            path="/api/v1/account/usage",
            status=200,
            duration_ms=1.5,
            account="acct-1",
        )
    )
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2026-01-01T00:00:00.250Z",
        "level": "info",
        "logger": "tally.access",
        "message": "GET /x 200",
        "request_id": "abc123",
        "method": "GET",
        "path": "/api/v1/account/usage",
        "status": 200,
        "duration_ms": 1.5,
        "account": "acct-1",
    }


def test_json_lines_keep_exceptions_and_odd_values() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed", where=logs)  # a module: not JSON, kept as text
        record.exc_info = sys.exc_info()
    doc = json.loads(logs.JsonFormatter().format(record))
    assert "ValueError: boom" in doc["exception"]
    assert doc["where"].startswith("<module 'schemas.logs'")


def test_text_lines_append_the_extras() -> None:
    line = logs.TextFormatter().format(_record(request_id="abc", status=404))
    assert line.endswith("INFO tally.access: GET /x 200 request_id=abc status=404")


@pytest.mark.parametrize(("fmt", "json_lines"), [("json", True), ("text", False)])
def test_configure_sets_both_loggers(fmt: logs.LogFormat, json_lines: bool) -> None:
    root, tally = logging.getLogger(), logging.getLogger("tally")
    saved = (root.handlers[:], root.level, tally.handlers[:], tally.level, tally.propagate)
    try:
        logs.configure(fmt, "error")
        assert root.level == logging.ERROR
        assert tally.level == logging.INFO
        assert not tally.propagate
        out = io.StringIO()
        handler = tally.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(out)
        logging.getLogger("tally.worker").info("partition %d resumes", 3)
        text = out.getvalue().strip()
        if json_lines:
            assert json.loads(text)["message"] == "partition 3 resumes"
        else:
            assert text.endswith("INFO tally.worker: partition 3 resumes")
    finally:
        root.handlers[:], tally.handlers[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        tally.setLevel(saved[3])
        tally.propagate = saved[4]


def test_dict_config_is_accepted_by_logging() -> None:
    config = logs.dict_config("json", "warning")
    assert config["disable_existing_loggers"] is False
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logging.config.dictConfig(config)
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
