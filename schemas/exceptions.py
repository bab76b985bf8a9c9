"""The root of every exception Tally raises on purpose, and the two kinds every area shares.

One tree, so that a caller can tell Tally's own refusals from bugs and from the
libraries underneath::

    TallyError                  anything Tally raises on purpose
    ├── OperatorError           the operator can fix it; `hint` says how
    │   ├── StoreError          the store cannot be used; `url` names it
    │   ├── producers.exceptions.GatewayStartError
    │   └── deploy.exceptions:  LocalServerError, TopicSetupError,
    │                           AdminCliError, ReconcileError
    ├── ClusterDDLError         a migration that cannot run ON CLUSTER
    ├── producers.exceptions:   GatewaySendError, SpoolError (SpoolLockedError,
    │                           SpoolFullError), FlushTimeoutError
    ├── processors.exceptions:  FencedError, SinkFencedError
    ├── query_api.exceptions:   AccountExistsError, UnknownAccountError,
    │                           PlanConfigError
    └── query_api.errors.ApiError   a refusal the HTTP API answers (its envelope)

`tally` commands (deploy/cli_support.py) print an `OperatorError` as one line and
exit 2; anything else keeps its traceback, because it is a bug to report. An
error that callers may catch as a builtin derives from that builtin too
(`OperatorError` is a `RuntimeError`, `PlanConfigError` a `ValueError`...), so an
`except` clause written against the builtin holds.
"""

from __future__ import annotations


class TallyError(Exception):
    """Anything Tally raises on purpose; not a bug by itself."""


class OperatorError(TallyError, RuntimeError):
    """A failure the operator can fix: the configuration, a port, a missing server.

    `str()` is the whole line a CLI prints: what happened, then `hint`, what to do.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(f"{message} {hint}".strip() if hint else message)
        self.message = message
        self.hint = hint


class StoreError(OperatorError):
    """The store at `url` (credentials redacted; '' when not known yet) cannot be used."""

    def __init__(self, message: str, hint: str = "", url: str = "") -> None:
        super().__init__(message, hint)
        self.url = url


class ClusterDDLError(TallyError, ValueError):
    """A migration statement that cannot be rewritten to run ON CLUSTER."""
