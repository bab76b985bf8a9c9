"""A KRaft Kafka cluster of N broker+controller nodes on 127.0.0.1 (`tally up --brokers N`).

Node i (1..N) listens on `port + i - 1` (9092-9094 for three) and keeps its data under
``<data_dir>/kafka-<i>``; every node is a controller voter. The replication factor is
min(3, N) for every topic, internal ones included, with `min.insync.replicas` 2 from
three nodes on: an acknowledged write (acks=all) is on two brokers at least, so the
loss of any one broker loses nothing and stops nothing.

``<data_dir>/kafka-cluster.json`` keeps the cluster id (every node is formatted with
it once) and the controller ports, so that a restart finds the same quorum.
"""

from __future__ import annotations

import json
import pathlib
from typing import Final

from deploy.kafka_local import LocalKafka, Quorum, new_cluster_id, read_properties
from deploy.processes import HOST, free_port, port_is_free

MAX_BROKERS: Final = 9


class LocalKafkaCluster:
    """N local brokers forming one cluster; a context manager like `LocalKafka`."""

    def __init__(
        self,
        data_dir: pathlib.Path,
        libs_dir: pathlib.Path,
        brokers: int = 3,
        port: int = 9092,
        heap: str = "512m",
    ) -> None:
        if not 1 <= brokers <= MAX_BROKERS:
            raise ValueError(f"brokers must be 1..{MAX_BROKERS}, got {brokers}")
        self.data_dir = pathlib.Path(data_dir).resolve()
        self.libs_dir = pathlib.Path(libs_dir).resolve()
        self.ports = [port + i for i in range(brokers)]
        self.heap = heap
        self.nodes: list[LocalKafka] = []

    @property
    def state_file(self) -> pathlib.Path:
        return self.data_dir / "kafka-cluster.json"

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{HOST}:{port}" for port in self.ports)

    def start(self, timeout: float = 120.0) -> None:
        """Start every node, then return once each lists all N brokers as registered.

        Nodes start without waiting one by one: none is ready before a majority of the
        controller quorum runs.
        """
        if self.nodes and all(node.pid is not None for node in self.nodes):
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id, voters = self._quorum()
        self.nodes = [
            LocalKafka(
                self.data_dir,
                self.libs_dir,
                port=port,
                heap=self.heap,
                quorum=Quorum(node_id, voters, cluster_id),
            )
            for node_id, port in zip(sorted(voters), self.ports, strict=True)
        ]
        try:
            for node in self.nodes:
                node.start(timeout, wait=False)
            for node in self.nodes:
                node.wait_ready(timeout, brokers=len(self.nodes))
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        for node in reversed(self.nodes):
            node.stop(timeout)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> LocalKafkaCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalKafkaCluster({self.bootstrap}, data={self.data_dir})"

    def _quorum(self) -> tuple[str, dict[int, int]]:
        """The cluster id and the voters' controller ports, kept across restarts.

        A recorded controller port that something else took meanwhile is replaced: the
        voters are static configuration, rendered anew on every start. Without a record,
        a node formatted before keeps its cluster id (formatting is never repeated).
        """
        recorded: dict[int, int] = {}
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
            cluster_id = str(state["cluster_id"])
            recorded = {int(k): int(v) for k, v in state["voters"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            formatted = [
                read_properties(self.data_dir / f"kafka-{i}" / "log" / "meta.properties")
                for i in range(1, len(self.ports) + 1)
            ]
            ids = {meta["cluster.id"] for meta in formatted if meta.get("cluster.id")}
            cluster_id = ids.pop() if len(ids) == 1 else new_cluster_id()
        taken = set(self.ports)
        voters: dict[int, int] = {}
        for node_id in range(1, len(self.ports) + 1):
            port = recorded.get(node_id)
            if port is None or port in taken or not port_is_free(port):
                port = free_port(exclude=frozenset(taken))
            voters[node_id] = port
            taken.add(port)
        state = {"cluster_id": cluster_id, "voters": voters}
        self.state_file.write_text(json.dumps(state, indent=1), encoding="utf-8")
        return cluster_id, voters
