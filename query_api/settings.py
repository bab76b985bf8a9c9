"""The API's configuration (`tally api`, and the API inside `tally up`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator

from query_api.plans import load_plans
from schemas.settings import TallySettings

ADMIN_KEY_MIN_LENGTH = 24
# Words the example files' placeholders are made of and the usual fill-me-in ones.
# Each is long or specific enough that a random key (hex or url-safe) almost never
# contains it: a 6-letter word turns up in about 1 in 30 million url-safe keys.
PLACEHOLDER_WORDS = ("change", "example", "placeholder", "replace", "xxxxxx", "openssl", "urlsafe")
# Fewer distinct characters than this is a typed pattern ("k" * 24), not a random key.
ADMIN_KEY_MIN_DISTINCT = 5
GENERATE_ADMIN_KEY = (
    'generate one with `python3 -c "import secrets; print(secrets.token_urlsafe(32))"` '
    "(or `openssl rand -hex 24`) and set TALLY_ADMIN_KEY to it"
)


def admin_key_problem(key: str) -> str | None:
    """Why `key` must not become an admin key, or None when it may.

    TALLY_ADMIN_KEY grants every admin route, so a value copied unchanged from
    an example file (deploy/k8s/secrets.env.example) or typed by hand must stop
    the API at start rather than become a working key anyone can read in the
    repository. Only the length, the variety of characters and placeholder
    words are checked: a random key passes whatever its alphabet.
    """
    if len(key) < ADMIN_KEY_MIN_LENGTH:
        return f"must be at least {ADMIN_KEY_MIN_LENGTH} random characters (got {len(key)})"
    lowered = key.lower()
    for word in PLACEHOLDER_WORDS:
        if word in lowered:
            return f"looks like a placeholder (it contains {word!r}), not a random key"
    if len(set(key)) < ADMIN_KEY_MIN_DISTINCT:
        return f"uses fewer than {ADMIN_KEY_MIN_DISTINCT} distinct characters: not a random key"
    return None


class ApiSettings(TallySettings):
    api_host: str = Field("127.0.0.1", description="Interface the API listens on.")
    api_port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    admin_key: SecretStr | None = Field(
        None,
        description="Accepted as an admin key, so a fresh deployment can be administered. "
        "At least 24 random characters; placeholders (containing change, example, replace, "
        '...) are refused: `python3 -c "import secrets; print(secrets.token_urlsafe(32))"`.',
    )
    plans: str | None = Field(
        None, description="JSON object overriding or adding plans (see query_api/plans.py)."
    )
    default_plan: str = Field("free", description="Plan of accounts created without one.")
    stream_idle_timeout_s: float = Field(
        900.0, gt=0, description="A stream not closed nor re-announced for this long is inactive."
    )
    window_history_days: float = Field(
        42.0, gt=0, description="History read to place first_request windows (see docs)."
    )
    analytics_max_buckets: int = Field(
        10_000, ge=1, description="Most time buckets one analytics query may ask for."
    )
    analytics_max_rows: int = Field(
        10_000,
        ge=1,
        description="Most rows (buckets x groups) one analytics series may have; a larger "
        "result is refused with 422 (never truncated), naming how to narrow the query.",
    )
    analytics_max_seconds: float = Field(
        5.0,
        ge=0.001,
        allow_inf_nan=False,
        description="Longest an analytics query may run in ClickHouse (max_execution_time); "
        "a slower one is refused with 422 asking for a narrower query.",
    )
    analytics_rows_per_token: int = Field(
        100,
        ge=1,
        description="Analytics answers are charged to the caller's API rate limit by size: "
        "one request, plus one more token per this many rows read (served or refused).",
    )
    api_max_body_bytes: int = Field(
        1_048_576,
        ge=1,
        description="Largest request body the API reads (by Content-Length, or counted as a "
        "chunked body streams in); over it the answer is 413 payload_too_large.",
    )
    processors_stale_s: float = Field(
        30.0,
        gt=0,
        description="/readyz fails when the store reflects no worker report this recent "
        "(an idle worker reports every TALLY_WORKER_FLUSH_INTERVAL_S).",
    )
    readyz_refresh_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="/readyz answers from a check at most this old: the store, Kafka and the "
        "workers' group are asked at most once per interval, however often it is called.",
    )
    api_rate_per_s: float = Field(
        50.0,
        gt=0,
        allow_inf_nan=False,
        description="The API's own limit on each caller (API key, or client IP for requests "
        "without a valid key): requests per second, sustained. Per API process: with M "
        "replicas a caller may make M x this.",
    )
    api_rate_burst: int = Field(
        100,
        ge=1,
        description="Requests a caller may make at once (the bucket size); after that, "
        "TALLY_API_RATE_PER_S. Over the limit the API answers 429 rate_limited with "
        "Retry-After.",
    )
    api_refusal_delay_s: float = Field(
        1.0,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="A 429 of the API's own limit is sent no sooner than the caller's next "
        "request could be allowed, at most this many seconds after the request: a client "
        "retrying without waiting for Retry-After is slowed down instead of keeping the API "
        "busy. 0 sends refusals at once.",
    )
    api_refusal_max_held: int = Field(
        1000,
        ge=0,
        description="At most this many 429s are held back (TALLY_API_REFUSAL_DELAY_S) at once; "
        "beyond that they are sent at once.",
    )
    api_usage_view: Literal["auto", "off"] = Field(
        "auto",
        description="Serve the usage endpoints and key checks from an in-memory view of the "
        "store, loaded at start and kept exact by this process's writes. auto: on for the "
        "embedded store (one process holds it, so it sees every write); always off with a "
        "ClickHouse server (other processes write there).",
    )
    api_view_max_rows: int = Field(
        5_000_000,
        ge=0,
        description="Most (account, minute) and stream rows the usage view holds; beyond it "
        "the API logs a warning and reads usage from the store per request.",
    )

    @field_validator("plans")
    @classmethod
    def _plans_parse(cls, value: str | None) -> str | None:
        load_plans(value)  # raises with every problem listed
        return value

    @field_validator("admin_key")
    @classmethod
    def _admin_key_strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            problem = admin_key_problem(value.get_secret_value())
            if problem:
                raise ValueError(f"{problem}; {GENERATE_ADMIN_KEY}")
        return value
