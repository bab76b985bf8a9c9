"""What the `tally` commands and the local servers raise on purpose.

All are `schemas.exceptions.OperatorError`s (the tree is drawn there): the
operator can fix each, and `tally` prints it as one line and exits 2 (or, for the
admin commands, the exit code the error carries). A RuntimeError base comes with
OperatorError, so `except RuntimeError` around a local server still holds.
"""

from __future__ import annotations

from schemas.exceptions import OperatorError

EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 2


class LocalServerError(OperatorError):
    """A local Kafka broker or ClickHouse server Tally runs could not start or answer
    (a port taken, no jars, no java, a child that exited); the hint says what to do."""


class TopicSetupError(OperatorError):
    """A topic exists in a shape we cannot use, or the broker refused to create it."""


class AdminCliError(OperatorError):
    """`tally accounts|keys` could not do what was asked: one line saying what went wrong
    and what to do. `exit_code` 1 is a refusal (unknown account, id taken), 2 no way to
    reach accounts; `status` is the HTTP-like status, which picks the command's hint."""

    def __init__(
        self, message: str, exit_code: int = EXIT_REFUSED, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


class ReconcileError(OperatorError):
    """`tally reconcile` could not make the check (exit 2); one line saying what to do."""
