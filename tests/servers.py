"""Stop and start the local PostgreSQL, Redis and RabbitMQ, for the fault suite: with the
same commands that start them on this kind of machine (.ci/run has them too)."""

from __future__ import annotations

import os

import anyio

from tests.pipeline import eventually


async def _run(*command: str) -> None:
    with anyio.fail_after(120):
        done = await anyio.run_process(list(command), check=False)
    assert done.returncode == 0, (command, done.stdout.decode()[-500:], done.stderr.decode()[-500:])


async def _answers(port: int) -> bool:
    try:
        with anyio.fail_after(1):
            stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.aclose()
        return True
    except (OSError, TimeoutError):
        return False


async def restart_postgresql() -> None:
    """A fast restart: every connection is cut, the server is back in a few seconds."""
    (version,) = os.listdir("/etc/postgresql")
    await _run(
        "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"
    )
    await eventually(lambda: _answers(5432), within=60, every=0.2)


async def restart_redis_empty(down_s: float) -> None:
    """Redis shut down without saving (it keeps nothing on disk here), started again after
    ``down_s`` seconds: every stream, group and key is gone."""
    await _run("redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave")
    try:
        await anyio.sleep(down_s)
    finally:  # started again even when the test is cancelled meanwhile
        with anyio.CancelScope(shield=True):
            await _start_redis()


async def _start_redis() -> None:
    await _run(
        "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
        "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
        "--logfile", "/var/log/redis/ci.log",
    )  # fmt: skip
    await eventually(lambda: _answers(6379), within=30, every=0.1)


async def stop_rabbitmq_for(seconds: float) -> None:
    """The broker's application stopped (connections refused) for ``seconds``, then started
    again; durable queues and exchanges survive."""
    await _run("rabbitmqctl", "stop_app")
    try:
        await anyio.sleep(seconds)
    finally:  # started again even when the test is cancelled meanwhile
        with anyio.CancelScope(shield=True):
            await _run("rabbitmqctl", "start_app")
            await eventually(lambda: _answers(5672), within=60, every=0.2)
