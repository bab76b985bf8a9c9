"""`tally reconcile`'s output: the outcome as text for people or as one JSON document."""

from __future__ import annotations

from typing import Any

from deploy.admin_cli import table
from deploy.reconcile_scan import Outcome
from schemas.totals import format_units
from schemas.windows import format_time


def _measure_label(name: str) -> str:
    if name == "units_micro":
        return "units"
    if name.startswith("events."):
        return "events " + name.removeprefix("events.")
    return name


def _value(name: str, value: int) -> str:
    return format_units(value) if name == "units_micro" else f"{value:,}"


def _delta(name: str, delta: int) -> str:
    return ("+" if delta > 0 else "") + _value(name, delta)


def as_json(outcome: Outcome) -> dict[str, Any]:
    report = outcome.report
    stats = outcome.stats
    return {
        "ok": report.ok,
        "minutes_from": format_time(report.since),
        "minutes_to": format_time(report.until),
        "account": outcome.account,
        "checked": {
            "accounts": report.accounts,
            "events": report.events,
            "units": format_units(report.units_micro).replace(",", ""),
            "units_micro": report.units_micro,
        },
        "drift": [
            {
                "account": d.account,
                "in_log": d.expected is not None,
                "in_rollups": d.stored is not None,
                "differences": [
                    {"measure": x.measure, "log": x.expected, "rollups": x.stored, "delta": x.delta}
                    for x in d.differences
                ],
            }
            for d in report.drifts
        ],
        "scan": {
            "topic": outcome.topic,
            "messages": stats.messages,
            "events": stats.events,
            "duplicates": stats.duplicates,
            "rejected": stats.rejected,
            "partitions": [
                {
                    "partition": s.partition,
                    "log_start": s.log_start,
                    "log_end": s.log_end,
                    "read_from": s.start,
                    "read_to": s.stop,
                }
                for s in outcome.partitions
            ],
        },
        "rollups_from": outcome.source,
        "warnings": outcome.warnings,
    }


def as_text(outcome: Outcome) -> str:
    report = outcome.report
    span = f"{format_time(report.since)} .. {format_time(report.until)}"
    recounted = f"{report.events:,} events, {format_units(report.units_micro)} units"
    if report.ok:
        return f"no drift: {report.accounts:,} accounts, {recounted} checked ({span})"
    rows = []
    for drift in report.drifts:
        note = (
            "only in the rollups"
            if drift.expected is None
            else "missing from the rollups"
            if drift.stored is None
            else ""
        )
        for x in drift.differences:
            rows.append(
                [
                    drift.account,
                    _measure_label(x.measure),
                    _value(x.measure, x.expected),
                    _value(x.measure, x.stored),
                    _delta(x.measure, x.delta),
                    note,
                ]
            )
    head = (
        f"drift in {len(report.drifts):,} of {report.accounts:,} accounts "
        f"({recounted} recounted, {span})"
    )
    body = table(rows, ["ACCOUNT", "MEASURE", "LOG", "ROLLUPS", "DIFF", "NOTE"])
    return f"{head}\nDIFF = rollups - log: + counted too much, - too little\n{body}"
