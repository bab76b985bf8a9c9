-- Alerts and webhook deliveries (docs/alerts.md), written by the alert evaluator and
-- the webhook dispatcher (query_api/alerts/) and the admin API.
--
-- Engines: ReplacingMergeTree(version), key = the row's identity, read with FINAL,
-- like accounts and keys. An alert's id is derived from (type, account, window,
-- window start, threshold), so writing it again after a restart replaces the row
-- instead of adding a second alert; a delivery's id is the webhook-id, derived from
-- the alert's id and the endpoint's, so a delivery re-created after a crash is the
-- same delivery.
CREATE TABLE IF NOT EXISTS alerts
(
    id              String,
    type            LowCardinality(String),
    account         String,
    plan            LowCardinality(String),
    window          LowCardinality(String),
    threshold       UInt16,
    used_percentage Float64,
    window_start    DateTime64(3, 'UTC'),
    resets_at       DateTime64(3, 'UTC'),
    emitted_at      DateTime64(3, 'UTC'),
    body            String,
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY id;

-- `secret` holds the signing secret encrypted (AES-256-GCM, docs/alerts.md#secrets).
-- `deleted` is a tombstone: deleting keeps the row so its delivery log stays readable.
CREATE TABLE IF NOT EXISTS webhook_endpoints
(
    id         String,
    url        String,
    events     Array(String),
    account    Nullable(String),
    secret     String,
    created_at DateTime64(3, 'UTC'),
    deleted    Bool,
    version    UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY id;

-- One row per message and endpoint; each attempt writes a newer version.
CREATE TABLE IF NOT EXISTS webhook_deliveries
(
    id               String,
    endpoint_id      String,
    alert_id         String,
    event_type       LowCardinality(String),
    body             String,
    status           LowCardinality(String),
    attempts         UInt16,
    next_attempt_at  DateTime64(3, 'UTC'),
    last_status_code Int32,
    created_at       DateTime64(3, 'UTC'),
    version          UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY id;

-- The delivery log: one row per HTTP attempt (status 0 = no answer), never replaced.
CREATE TABLE IF NOT EXISTS webhook_attempts
(
    endpoint_id String,
    delivery_id String,
    attempt     UInt16,
    at          DateTime64(3, 'UTC'),
    status_code Int32,
    latency_ms  Float64,
    error       String
)
ENGINE = MergeTree
ORDER BY (endpoint_id, at, delivery_id);
