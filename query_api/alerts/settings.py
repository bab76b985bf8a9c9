"""Configuration of alerts and webhook deliveries (docs/alerts.md)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from schemas.settings import TallySettings

# Standard Webhooks' suggested schedule: after the first attempt, retry 5 s, 5 min,
# 30 min, 2 h, 5 h, 10 h and 10 h later (27 h 35 min 5 s in all).
STANDARD_SCHEDULE = "5,300,1800,7200,18000,36000,36000"


class AlertSettings(TallySettings):
    alerts_topic: str = Field(
        "tally.alerts",
        min_length=1,
        max_length=249,
        description="Compacted topic the alert events are published to, keyed by alert id.",
    )
    alerts_enabled: bool = Field(
        True,
        description="Evaluate thresholds and deliver webhooks in the process that runs the sink.",
    )
    alerts_late_s: float = Field(
        3600.0,
        ge=0,
        description="A window stays open to alerts this long after it ends: late events and "
        "a restarted evaluator may still raise its alerts (docs/alerts.md#late-events).",
    )
    alerts_interval_s: float = Field(
        0.5, gt=0, description="How often the evaluator looks at the accounts the sink wrote."
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs on loopback, private, link-local or reserved "
        "addresses (refused by default: SSRF).",
    )
    webhook_secret_key: SecretStr | None = Field(
        None,
        description="Key material the webhook signing secrets are encrypted with at rest. "
        "Unset: a random key in <data_dir>/webhook.key (mode 0600), made on first use; set "
        "it when the API and the sinks do not share a data_dir.",
    )
    webhook_retry_schedule_s: str = Field(
        STANDARD_SCHEDULE,
        description="Seconds to wait before each retry of a failed delivery, comma-separated "
        "(the default spans 27.6 h); after the last, the delivery is `failed`.",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=60, description="How long one delivery attempt may take."
    )

    @field_validator("webhook_secret_key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        # Empty (a compose default) means unset; anything else must be worth a key.
        if value is None or value.get_secret_value() == "":
            return None
        if len(value.get_secret_value()) < 24:
            raise ValueError("must be 24+ random characters, e.g. `openssl rand -hex 24`")
        return value

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            delays = [float(part) for part in value.split(",")]
        except ValueError:
            raise ValueError("expected seconds separated by commas, e.g. 5,300,1800") from None
        if not delays or any(d < 0 for d in delays):
            raise ValueError("expected at least one delay, none negative")
        return value

    @property
    def retry_delays(self) -> tuple[float, ...]:
        return tuple(float(part) for part in self.webhook_retry_schedule_s.split(","))
