"""Log lines of every Tally process, as text or JSON (TALLY_LOG_FORMAT).

One place decides the format so `tally up`, `worker`, `sink` and `api` write
alike: `text` for a person at a terminal, `json` (one object per line) for a
log shipper. Fields passed in a record's `extra` (the API's request_id, method,
path, status, duration_ms, account) become top-level JSON keys.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ms), level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd extra (a datetime, a Path) must not lose the line.
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with a record's extras appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        ]
        return f"{line} {' '.join(extras)}" if extras else line


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def handler(log_format: LogFormat) -> logging.Handler:
    """A stderr handler in the chosen format (also handed to faust/mode's worker)."""
    out = logging.StreamHandler()
    out.setFormatter(formatter(log_format))
    return out


def configure(log_format: LogFormat, library_level: str = "warning") -> None:
    """Root at the libraries' level, Tally's own loggers ("tally.*") always at info.

    Idempotent: calling it again (once the settings are loaded) replaces the handlers.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(log_format))
    root.setLevel(library_level.upper())
    tally = logging.getLogger("tally")
    for old in list(tally.handlers):
        tally.removeHandler(old)
    # A handler of its own: faust/mode re-configure the root logger when they start.
    tally.addHandler(handler(log_format))
    tally.propagate = False
    tally.setLevel(logging.INFO)


def dict_config(log_format: LogFormat, library_level: str = "warning") -> dict[str, Any]:
    """The same set-up as a logging dictConfig, for faust/mode's Worker(logging_config=...).

    Their worker re-configures logging when it starts; without this it would put
    its own (text, stdout) handler on the root logger.
    """
    level = library_level.upper()
    return {
        "version": 1,
        # Keep the loggers made so far ("tally.*" above all) working.
        "disable_existing_loggers": False,
        "formatters": {"tally": {"()": JsonFormatter if log_format == "json" else TextFormatter}},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "tally", "level": level}
        },
        "root": {"level": level, "handlers": ["default"]},
    }
