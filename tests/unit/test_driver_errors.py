"""Which driver errors are the server's or the connection's (tried again) and which are the
operations' (streamsvc.adapters.postgres.translate)."""

from __future__ import annotations

import asyncpg
import pytest

from streamsvc.adapters.postgres import LockWait, StatementTimeout, translate
from streamsvc.errors import PermanentError, TransientError


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("reset by peer"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        ),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
    ],
)
def test_what_a_terminated_or_restarting_server_raises_is_tried_again(error: Exception) -> None:
    translated = translate(error)
    assert isinstance(translated, TransientError), translated
    assert not isinstance(translated, PermanentError)


def test_a_statement_s_own_error_is_the_operations_and_waits_are_their_own_kind() -> None:
    refused = translate(asyncpg.exceptions.CheckViolationError("violates check constraint"))
    assert isinstance(refused, PermanentError)
    assert isinstance(translate(asyncpg.exceptions.QueryCanceledError("timeout")), StatementTimeout)
    assert isinstance(translate(asyncpg.exceptions.LockNotAvailableError("lock")), LockWait)
