"""A write on a Redis connection closed meanwhile (streamsvc.adapters.redis_writes), on the
real Redis: raised as the ConnectionError it is, and the client goes on."""

from __future__ import annotations

from typing import Any

import pytest
import redis.exceptions

from benchmarks.harness import REDIS_URL
from streamsvc.adapters import streams as rs

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


class ClosedWriter:
    """What a stream writer is when the transport under it was torn down mid-write."""

    def writelines(self, _: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    def write(self, _: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'write'")


async def test_a_write_on_a_connection_closed_meanwhile_is_a_lost_connection() -> None:
    client = rs.connect(REDIS_URL)
    try:
        assert await client.ping()
        connection = await client.connection_pool.get_connection()
        try:
            await connection.connect()
            real = connection._writer
            connection._writer = ClosedWriter()
            with pytest.raises(redis.exceptions.ConnectionError, match="closed while"):
                await connection.send_command("PING")
            assert not connection.is_connected, "dropped: the next command connects again"
            if real is not None:
                real.close()
        finally:
            await client.connection_pool.release(connection)
        assert await client.ping(), "the client goes on"
    finally:
        await client.aclose()
