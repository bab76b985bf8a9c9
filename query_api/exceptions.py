"""What the API's data layer raises on purpose: each a `schemas.exceptions.TallyError`.

These never reach a client as they are: the admin operations (query_api/admin_ops.py)
turn them into `query_api.errors.ApiError`, the one error envelope, and a bad
TALLY_PLANS is refused when the settings load. `query_api.guard.BodyTooLargeError`
stays an HTTPException: FastAPI re-raises only those unchanged while reading a body.
"""

from __future__ import annotations

from schemas.exceptions import TallyError


class AccountExistsError(TallyError):
    """An account with this id exists already."""


class UnknownAccountError(TallyError):
    """No account has this id."""


class PlanConfigError(TallyError, ValueError):
    """TALLY_PLANS cannot be used; the message lists every problem. A ValueError, so
    that the settings' validator reports it as a settings error."""
