"""The ClickHouse cluster variant of the schema (TALLY_CLICKHOUSE_CLUSTER).

The migration files are written for one server. `render(statement, cluster)`
turns one of their statements into its cluster form: DDL runs `ON CLUSTER`,
and each MergeTree-family engine becomes its Replicated twin with the standard
Keeper path '/clickhouse/tables/{shard}/{database}/{table}' and '{replica}'
(macros every replica defines). Engine parameters, columns and ORDER BY are
kept as they are, so the comments in the migration files about key order and
merge behaviour hold for every replica. With no cluster it returns the
statement untouched: the single-node path is exactly the files' SQL.

Topology: ONE shard, any number of replicas, and no Distributed tables. This
is deliberate, because of how the sink stays exact (processors/sink.py): one
INSERT carries a run of deltas *and* the offset markers saying they are
applied, and it is safe only because that INSERT becomes one atomic part.
- An INSERT into a Distributed table is by default queued and forwarded
  later, and with several shards split into one part per shard. A crash in
  between leaves markers and deltas disagreeing: deltas applied twice, or
  skipped. So the sink must write a local table.
- A replicated local table keeps the guarantee: the INSERT is one part on the
  replica that took it, and replication copies whole parts, so every replica
  sees the deltas and their markers together or not at all.
- With one shard every replica holds all the data, so the API reads the local
  tables on whichever replica it talks to; a Distributed table would add only
  another hop.
Spreading the rollups over several shards needs one sink per shard, each
writing its shard's local table with its own markers; the sink does not do
that (see docs/scaling.md), so `check_shards` refuses such a cluster instead
of letting it half-work.
"""

from __future__ import annotations

import re

from schemas.exceptions import ClusterDDLError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
ZK_PATH = "'/clickhouse/tables/{shard}/{database}/{table}'"
REPLICA = "'{replica}'"

_CREATE_TABLE = re.compile(
    r"^(CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?[A-Za-z_][A-Za-z0-9_.]*)(\s)", re.I
)
_CREATE_DATABASE = re.compile(
    r"^(CREATE\s+DATABASE\s+(?:IF\s+NOT\s+EXISTS\s+)?[A-Za-z_][A-Za-z0-9_]*)(\s|$)", re.I
)
_ALTER_OR_DROP = re.compile(
    r"^((?:ALTER|DROP)\s+TABLE\s+(?:IF\s+EXISTS\s+)?[A-Za-z_][A-Za-z0-9_.]*)(\s|$)", re.I
)
# `ENGINE = <Name>MergeTree` with optional parameters; the name group captures the
# family prefix ('', 'Aggregating', 'Replacing', 'Summing', ...).
_ENGINE = re.compile(r"\bENGINE\s*=\s*(?P<family>[A-Za-z]*)MergeTree\b(?P<args>\s*\([^)]*\))?")
_ANY_ENGINE = re.compile(r"\bENGINE\s*=\s*(?P<name>[A-Za-z]+)")


def valid_cluster(cluster: str) -> bool:
    return cluster == "" or bool(_IDENT.fullmatch(cluster))


def render(statement: str, cluster: str) -> str:
    """`statement` as it must run on `cluster` ('' = one server: unchanged)."""
    if cluster == "":
        return statement
    if not _IDENT.fullmatch(cluster):
        raise ClusterDDLError(
            f"cluster name {cluster!r} is not a plain name (letters, digits, _ and -); "
            "set TALLY_CLICKHOUSE_CLUSTER to a cluster of the server's remote_servers"
        )
    on_cluster = rf"\1 ON CLUSTER `{cluster}`\2"
    if _CREATE_TABLE.match(statement):
        return _replicated(_CREATE_TABLE.sub(on_cluster, statement, count=1))
    for pattern in (_CREATE_DATABASE, _ALTER_OR_DROP):
        if pattern.match(statement):
            return pattern.sub(on_cluster, statement, count=1)
    # Refusing is safer than running a statement on one replica only.
    raise ClusterDDLError(
        f"no cluster form for this statement: {statement[:80]!r}...; "
        "teach schemas/cluster.py how to run it ON CLUSTER"
    )


def _replicated(statement: str) -> str:
    match = _ENGINE.search(statement)
    if match is None or match.group("family").startswith("Replicated"):
        found = _ANY_ENGINE.search(statement)
        name = found.group("name") if found else "none"
        raise ClusterDDLError(
            f"table engine {name} has no replicated form here; a cluster table needs a "
            "plain MergeTree-family engine in the migration (schemas/cluster.py)"
        )
    args = (match.group("args") or "").strip()
    inner = args[1:-1].strip() if args else ""
    params = ", ".join(p for p in (ZK_PATH, REPLICA, inner) if p)
    engine = f"ENGINE = Replicated{match.group('family')}MergeTree({params})"
    return statement[: match.start()] + engine + statement[match.end() :]


def check_shards(cluster: str, shards: int) -> None:
    """Refuse a cluster the sink cannot keep exact (see the module's docstring)."""
    if shards == 0:
        raise ClusterDDLError(
            f"the server knows no cluster {cluster!r} (system.clusters); define it in "
            "remote_servers or fix TALLY_CLICKHOUSE_CLUSTER"
        )
    if shards > 1:
        raise ClusterDDLError(
            f"cluster {cluster!r} has {shards} shards; Tally's single sink needs one shard "
            "with any number of replicas (docs/scaling.md). Use a one-shard cluster."
        )
