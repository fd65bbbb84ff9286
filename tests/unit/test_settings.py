import pytest

from streamsvc import settings
from streamsvc.allowlist import TableRef
from streamsvc.errors import ConfigError


def test_defaults_reach_the_local_servers() -> None:
    s = settings.load({}, env_file=None)
    assert (s.db_host, s.db_port) == ("127.0.0.1", 5432)
    assert s.redis_url.startswith("redis://127.0.0.1:6379")
    assert s.rmq_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.auth_on and s.http_port == 3000


def test_old_variable_names_are_read() -> None:
    s = settings.load(
        {
            "DB_HOST": "db",
            "BATCH_PROCESS_OPERATION_LIMIT": "250",
            "BATCH_PROCESS_OPERATION_INTERVAL": "1500",
            "LOG_LEVEL": "DEBUG",
        },
        env_file=None,
    )
    assert (s.db_host, s.batch_limit, s.interval_ms, s.log_level) == ("db", 250, 1500, "debug")


def test_env_file_is_read_and_environment_wins(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / ".env"  # type: ignore[operator]
    path.write_text("DB_NAME=from_file\nDB_PORT=6543\n")
    s = settings.load({"DB_PORT": "7654"}, env_file=str(path))
    assert (s.db_name, s.db_port) == ("from_file", 7654)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DB_PORT": "five"}, "DB_PORT: expected `int`"),
        ({"DB_PORT": "70000"}, "DB_PORT: expected `int` <= 65535"),
        (
            {"BATCH_PROCESS_OPERATION_LIMIT": "0"},
            "BATCH_PROCESS_OPERATION_LIMIT: expected `int` >= 1",
        ),
        ({"STREAMSVC_AUTH": "maybe"}, "STREAMSVC_AUTH: invalid enum value 'maybe'"),
        ({"STREAMSVC_ALLOWED_TABLES": "orders, bad name"}, "STREAMSVC_ALLOWED_TABLES: 'bad name'"),
    ],
)
def test_a_bad_value_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings.load(env, env_file=None)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_allow_list_parsing() -> None:
    s = settings.load(
        {"STREAMSVC_ALLOWED_TABLES": "orders, billing.payments(id, amount), counters"},
        env_file=None,
    )
    allow = s.allow_list
    assert allow.tables == {
        TableRef("public", "orders"): None,
        TableRef("billing", "payments"): frozenset({"id", "amount"}),
        TableRef("public", "counters"): None,
    }
    assert allow.resolve("public.orders") == TableRef("public", "orders")
    assert allow.resolve("payments") is None  # lives in billing, not public
    assert allow.column_allowed(TableRef("billing", "payments"), "amount")
    assert not allow.column_allowed(TableRef("billing", "payments"), "secret")


def test_empty_allow_list_allows_nothing() -> None:
    assert not settings.load({}, env_file=None).allow_list
