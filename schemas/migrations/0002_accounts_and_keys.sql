-- Accounts and API keys, written by the admin API and CLI (query_api/accounts.py).
--
-- Engine: ReplacingMergeTree(version). A change is a new row with a larger
-- version (nanoseconds); readers use FINAL so they always see the newest row of
-- a key even before a merge folds the old ones away. These tables are tiny next
-- to the rollups, so FINAL costs little, and no second database is needed.
--
-- Key: the id we look rows up by, alone, so one key = one logical row.
CREATE TABLE IF NOT EXISTS accounts
(
    id                 String,
    plan               LowCardinality(String),
    -- day of the month the billing period starts (1 = calendar month)
    billing_anchor_day UInt8 DEFAULT 1,
    created_at         DateTime64(3, 'UTC'),
    updated_at         DateTime64(3, 'UTC'),
    version            UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY id;

-- Only the SHA-256 of a key is stored; the key itself is shown once at creation.
CREATE TABLE IF NOT EXISTS api_keys
(
    prefix     String,
    key_hash   String,
    account    String,
    is_admin   Bool,
    created_at DateTime64(3, 'UTC'),
    revoked_at Nullable(DateTime64(3, 'UTC')),
    version    UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY prefix;
