"""A real Redis Cluster of three masters on spare ports, for the cluster-mode tests: started
with redis-server in cluster mode and joined with `redis-cli --cluster create`, as an
operator would; and a slot moved between masters the way `redis-cli --cluster reshard`
moves it (SETSLOT IMPORTING/MIGRATING, MIGRATE of its keys, SETSLOT NODE)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

MASTERS = 3
BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def spare_ports(count: int) -> list[int]:
    """``count`` ports whose cluster bus ports (+10000) are free too."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + BUS_OFFSET <= 65535 and _free(port + BUS_OFFSET) and port not in found:
            found.append(port)
    return found


@dataclass
class Cluster:
    ports: list[int]

    @property
    def url(self) -> str:
        """A seed node's REDIS_URL."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node(self, port: int) -> Any:
        """A client of one node (untyped: the cluster commands go by name)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)

    def node_id(self, port: int) -> str:
        with self.node(port) as client:
            return str(client.execute_command("CLUSTER MYID").decode())

    def owner(self, slot: int) -> int:
        """The port of the master that holds ``slot``."""
        with self.node(self.ports[0]) as client:
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"slot {slot} is not covered")

    def move_slot(self, slot: int, to_port: int, *, batch: int = 10) -> int:
        """Move ``slot`` to the master on ``to_port`` while clients keep using it; returns
        how many keys moved. Clients see ASK redirections during the move, MOVED after."""
        from_port = self.owner(slot)
        if from_port == to_port:
            return 0
        source, target = self.node(from_port), self.node(to_port)
        source_id, target_id = self.node_id(from_port), self.node_id(to_port)
        moved = 0
        with source, target:
            target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
            while keys := source.execute_command("CLUSTER GETKEYSINSLOT", slot, batch):
                source.execute_command(
                    "MIGRATE", "127.0.0.1", to_port, "", 0, 10_000, "KEYS", *keys
                )
                moved += len(keys)
            for port in self.ports:  # every master learns the new owner at once
                with self.node(port) as client:
                    client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        return moved


def _wait_ok(ports: list[int], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while True:
        states = []
        for port in ports:
            with redis.Redis(host="127.0.0.1", port=port) as client:
                info = client.execute_command("CLUSTER INFO")
            states.append(info.get("cluster_state") == "ok")
        if all(states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the cluster on {ports} did not become ok within {within} s")
        time.sleep(0.1)


@contextlib.contextmanager
def started(workdir: Path) -> Iterator[Cluster]:
    """Three masters, no replicas, no persistence, gone (with their files) afterwards."""
    ports = spare_ports(MASTERS)
    for port in ports:
        home = workdir / str(port)
        home.mkdir(parents=True)
        subprocess.run(
            [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                "--dir", str(home), "--logfile", str(home / "redis.log"), "--daemonize", "yes",
            ],
            check=True,
        )  # fmt: skip
    try:
        for port in ports:
            deadline = time.monotonic() + 10
            while _free(port) and time.monotonic() < deadline:
                time.sleep(0.05)
        subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        _wait_ok(ports)
        yield Cluster(ports)
    finally:
        for port in ports:  # redis-cli: redis-py retries the connection SHUTDOWN closes
            subprocess.run(
                ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "shutdown", "nosave"],
                capture_output=True,
                check=False,
            )
        shutil.rmtree(workdir, ignore_errors=True)
