-- Per-account, per-minute usage deltas, written by the sink (processors/sink.py);
-- its columns, INSERT and offset markers are described in schemas/rollup_table.py.
--
-- Engine: AggregatingMergeTree with SimpleAggregateFunction columns. Each flush
-- appends deltas; background merges fold rows with the same key by summing the
-- counters and keeping the max of `offset_end`. Merges are eventual, so every
-- reader aggregates (sum/max ... GROUP BY) rather than trusting one row per key.
--
-- Key order: `account` first because almost every query is about one account;
-- `minute` next so a window (today, this week, the session) is one range scan
-- within it; the dimensions last, so one (account, minute) folds to one row per
-- combination of type/route/method/model/status. `stream_id` is '' for requests
-- and names the stream for stream events, so active streams are countable.
--
-- No PARTITION BY, on purpose: an INSERT spanning several partitions becomes
-- several parts, and the sink relies on one INSERT being one atomic part. The
-- offset markers (reserved account '', type 'kafka.offset', route = topic,
-- status = partition, offset_end = next offset) ride in the same INSERT as the
-- deltas they cover, so deltas and applied offsets can never disagree: for the
-- rollups topic they say where the sink resumes; for the events topic they say
-- how far each partition is counted, and last_time up to when (freshness).
CREATE TABLE IF NOT EXISTS rollup_minute
(
    account        String,
    minute         DateTime('UTC'),
    type           LowCardinality(String),
    route          LowCardinality(String),
    method         LowCardinality(String),
    model          LowCardinality(String),
    status         UInt16,
    stream_id      String,
    events         SimpleAggregateFunction(sum, UInt64),
    -- units are metered in millionths so sums are exact integers
    units_micro    SimpleAggregateFunction(sum, UInt64),
    latency_ms_sum SimpleAggregateFunction(sum, Float64),
    bytes_in       SimpleAggregateFunction(sum, UInt64),
    bytes_out      SimpleAggregateFunction(sum, UInt64),
    -- the latest event time in the row: stream idle timeouts, data freshness
    last_time      SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    offset_end     SimpleAggregateFunction(max, Int64)
)
ENGINE = AggregatingMergeTree
ORDER BY (account, minute, type, route, method, model, status, stream_id);
