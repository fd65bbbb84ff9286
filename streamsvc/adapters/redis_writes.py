"""A write on a Redis connection closed meanwhile is a lost connection, not a crash.

redis-py's asyncio connections write through the transport of an ``asyncio`` stream. When
the connection is dropped while a command is being written (the server or the client
closes it: redis-py's cluster client drops a node's connections when it learns a new
layout, which it does while slots move), the write fails with the transport's own
``AttributeError`` (``'NoneType' object has no attribute 'writelines'``) or ``TypeError``
instead of redis-py's ``ConnectionError`` (redis/redis-py#4287, not fixed in 8.1). No
retry of redis-py's knows those errors, nor do the service's actors, so one killed a
notifier while a slot moved (docs/faults.md). Here such an error while writing is raised
as the ``ConnectionError`` it is, after dropping the connection; redis-py's cluster client
then sends the command again on a new one, and the actors take it as Redis being away.

``install`` puts it in place, once, for every ``redis.asyncio`` connection of the process
(streamsvc.adapters.streams.connect calls it).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis.exceptions
from redis.asyncio.connection import AbstractConnection

Send = Callable[..., Awaitable[None]]


def _as_lost_connection(send: Send) -> Send:
    @functools.wraps(send)
    async def send_packed_command(
        self: AbstractConnection, command: bytes | str | Iterable[bytes], *args: Any, **kw: Any
    ) -> None:
        try:
            await send(self, command, *args, **kw)
        except (AttributeError, TypeError) as exc:
            await self.disconnect(nowait=True)
            raise redis.exceptions.ConnectionError(
                f"the connection closed while a command was written: {exc}"
            ) from exc

    send_packed_command.lost_connection = True  # type: ignore[attr-defined]
    return send_packed_command


def install() -> None:
    """Wrap redis-py's ``send_packed_command``, unless it is wrapped already."""
    send = AbstractConnection.send_packed_command
    if not getattr(send, "lost_connection", False):
        AbstractConnection.send_packed_command = _as_lost_connection(send)  # type: ignore[method-assign,assignment]
