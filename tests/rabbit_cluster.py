"""A private three-node RabbitMQ cluster for the tests that kill cluster members.

Three `PrivateRabbit` nodes (tests/rabbit_node.py): each its own name, AMQP and
distribution ports, data directory, all with one Erlang cookie, joined into one
cluster (`stop_app; join_cluster; start_app` on the second and third). Never the
machine's shared RabbitMQ (rabbit@<host> on 5672).

`leader(queue)` says which node leads a quorum queue; `kill(node)` is a SIGKILL of
that node's beam.smp and `restart(node)` starts it again on the same data
directory, so it comes back as a member of the cluster with its own copy of each
quorum queue's log, as after a real crash.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from pathlib import Path

from tests.rabbit_node import PrivateRabbit

log = logging.getLogger(__name__)


class PrivateCluster:
    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = base
        cookie = secrets.token_hex(16).upper()
        tag = secrets.token_hex(3)
        self.nodes = [PrivateRabbit(base / f"n{i}", cookie=cookie,
                                    name=f"rel-{tag}-n{i}@localhost") for i in range(1, size + 1)]
        self.start_seconds: list[float] = []  # how long each (re)start took

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def rmq_url(self) -> str:
        """Every node's URL, separated by commas (RMQ_URL's form for a cluster)."""
        return ",".join(self.urls)

    def start(self) -> None:
        """Start every node and join the second and later to the first."""
        first, *rest = self.nodes
        self.start_seconds.append(first.start())
        for node in rest:
            self.start_seconds.append(node.start())
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        self.wait_running(len(self.nodes))

    def running(self, via: PrivateRabbit | None = None) -> list[str]:
        """The names of the cluster's running nodes, as `via` (or any live node) sees them."""
        for node in [via] if via else self.live():
            try:
                status = json.loads(node.ctl("cluster_status", "--formatter", "json",
                                             timeout=30))
            except (RuntimeError, ValueError):
                continue
            return sorted(status.get("running_nodes", []))
        return []

    def wait_running(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.running()) >= count:
                return
            time.sleep(0.3)
        raise TimeoutError(f"fewer than {count} nodes running: {self.running()}")

    def live(self) -> list[PrivateRabbit]:
        return [node for node in self.nodes if node.pid is not None]

    def node_named(self, name: str) -> PrivateRabbit:
        return next(node for node in self.nodes if node.name == name)

    def add_vhost(self, vhost: str) -> str:
        """A vhost on the cluster, open to guest; returns the cluster's RMQ_URL for it."""
        from urllib.parse import quote

        first = self.nodes[0]
        first.ctl("add_vhost", vhost)
        first.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return ",".join(f"amqp://guest:guest@127.0.0.1:{n.port}/{quote(vhost, safe='')}"
                        for n in self.nodes)

    def queues(self, vhost: str) -> list[dict[str, object]]:
        """`rabbitmqctl list_queues name type leader members messages` on a live node."""
        for node in self.live():
            try:
                out = node.ctl("list_queues", "-p", vhost, "name", "type", "leader", "members",
                               "messages", "--formatter", "json", timeout=30)
                return list(json.loads(out))
            except (RuntimeError, ValueError):
                continue
        return []

    def leader(self, vhost: str, queue: str) -> PrivateRabbit | None:
        """The node that leads quorum queue `queue` (None when none is known)."""
        for q in self.queues(vhost):
            if q.get("name") == queue and isinstance(q.get("leader"), str):
                try:
                    return self.node_named(str(q["leader"]))
                except StopIteration:
                    return None
        return None

    def kill(self, node: PrivateRabbit) -> None:
        node.kill()

    def restart(self, node: PrivateRabbit) -> float:
        """Start a killed node again; it rejoins with the data it had. Returns seconds."""
        seconds = node.start()
        self.start_seconds.append(seconds)
        return seconds

    def stop(self) -> None:
        """Kill every node (a cluster torn down: no clean leave needed) and remove files."""
        for node in self.nodes:
            try:
                if node.pid is not None:
                    node.kill()
            except Exception:  # noqa: BLE001 - the next node is stopped anyway
                log.exception("killing %s", node.name)
            node.stop()
        shutil.rmtree(self.base, ignore_errors=True)
