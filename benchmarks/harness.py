"""`streamsvc run` as a child process, driven and signalled as in production (tests, bench)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypedDict

import anyio
import asyncpg
import hiredis
import msgspec


class PgParams(TypedDict):
    """asyncpg.connect's keywords for the local PostgreSQL server."""

    host: str
    port: int
    user: str


# The local servers every benchmark runs against (the service's own variable names).
PG: PgParams = {
    "host": os.environ.get("DB_HOST", "127.0.0.1"),
    "port": int(os.environ.get("DB_PORT", 5432)),
    "user": os.environ.get("DB_USERNAME", "postgres"),
}
RMQ_URL = os.environ.get("BATCH_SERVICE_RMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


Send = Callable[..., Coroutine[Any, Any, None]]


def free_port() -> int:
    """A TCP port nothing listens on now, for a child's HTTP server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = {**os.environ, **env, "LOG_LEVEL": "info"}
        self.env.setdefault("STREAMSVC_HTTP_PORT", str(free_port()))
        self.workdir = workdir  # no .env there: the test's variables are all it reads
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"service-{self.starts}.log"

    async def start(self, *args: str) -> None:
        self.spawn("run", *args)
        await self.wait_for_log('"service.started"')

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamsvc", *args],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.proc

    def replay_process(self, *args: str) -> subprocess.Popen[bytes]:
        """`streamsvc replay ARGS` with the service's settings, beside it; what it prints
        goes to ``replay-<pid>.log`` in the work directory (`replay_log`)."""
        with open(self.workdir / "replay.log.tmp", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streamsvc", "replay", *args],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        (self.workdir / "replay.log.tmp").rename(self.workdir / f"replay-{proc.pid}.log")
        return proc

    def replay_log(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.workdir / f"replay-{proc.pid}.log").read_text(errors="replace")

    async def wait_for_log(self, needle: str, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while needle not in self.log():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle} not logged within {within} s:\n{self.log()}")
            await anyio.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    async def terminate(self, within: float = 30.0) -> int:
        """SIGTERM, then the exit code once it has drained."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"did not stop within {within} s:\n{self.log()}")
            await anyio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def start_together(starts: Sequence[Callable[[], Coroutine[Any, Any, object]]]) -> None:
    """Run each of ``starts`` (a service process starting) side by side: each takes its own
    time to import and connect, and the slowest sets the pace."""
    async with anyio.create_task_group() as tg:
        for start in starts:
            tg.start_soon(start)


async def produce(
    redis: Any, inbox: str, ops: list[dict[str, Any]], *, pipeline: int = 1000
) -> None:
    """What a producer does: one XADD per operation to the inbox, pipelined."""
    async with producer(redis, inbox) as send:
        await send(ops, pipeline=pipeline)


@asynccontextmanager
async def producer(redis: Any, inbox: str) -> AsyncIterator[Send]:
    """Producers' connections to ``redis``'s server, adding to ``inbox``: yields
    ``send(ops)``, which XADDs one entry per operation, ``pipeline`` at a time, on a
    connection of its own (several sends may run at once). The commands go to the socket
    already in Redis's protocol and the replies are only counted (by hiredis), so the load
    takes little of the CPU the service shares."""
    idle: list[_Connection] = []
    where = redis.connection_pool.connection_kwargs
    head = b"*5\r\n" + _arguments(b"XADD", inbox.encode(), b"*", b"op")  # then the body

    async def send(ops: list[dict[str, Any]], *, pipeline: int = 1000) -> None:
        conn = idle.pop() if idle else await _Connection.open(where)
        await conn.xadd(head, ops, pipeline)
        idle.append(conn)  # not on failure: a connection in an unknown state is dropped

    try:
        yield send
    finally:
        for conn in idle:
            await conn.sock.aclose()


def _command(*parts: bytes) -> bytes:
    """One command in Redis's protocol (RESP)."""
    return b"*%d\r\n" % len(parts) + _arguments(*parts)


def _arguments(*parts: bytes) -> bytes:
    return b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class _Connection:
    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()

    @classmethod
    async def open(cls, where: dict[str, Any]) -> _Connection:
        sock = await anyio.connect_tcp(where.get("host", "127.0.0.1"), where.get("port", 6379))
        conn = cls(sock)
        greeting = []
        if where.get("password"):
            user = where.get("username") or "default"
            greeting.append(_command(b"AUTH", user.encode(), where["password"].encode()))
        if where.get("db"):
            greeting.append(_command(b"SELECT", str(where["db"]).encode()))
        if greeting:
            await sock.send(b"".join(greeting))
            await conn.replies(len(greeting))
        return conn

    async def xadd(self, head: bytes, ops: list[dict[str, Any]], pipeline: int) -> None:
        encode = msgspec.json.encode
        for start in range(0, len(ops), pipeline):
            chunk = ops[start : start + pipeline]
            commands = []
            for op in chunk:
                body = encode(op)
                commands.append(head + b"$%d\r\n%s\r\n" % (len(body), body))
            await self.sock.send(b"".join(commands))
            await self.replies(len(chunk))

    async def replies(self, count: int) -> None:
        """Read ``count`` replies; an error reply is raised."""
        while count:
            self.reader.feed(await self.sock.receive())
            while count and (reply := self.reader.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise reply
                count -= 1


async def count_status(conn: asyncpg.Connection, status: str) -> int:
    return int(
        await conn.fetchval('SELECT count(*) FROM "BatchOperations" WHERE status = $1', status)
    )
