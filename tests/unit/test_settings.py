from pathlib import Path

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


@pytest.mark.parametrize("spelling", ["production", "Production", "PRODUCTION", " production "])
def test_production_in_any_spelling_refuses_auth_off(spelling: str) -> None:
    s = settings.load({"NODE_ENV": spelling, "STREAMSVC_AUTH": "off"}, env_file=None)
    assert s.production
    with pytest.raises(ConfigError, match=r"^STREAMSVC_AUTH: cannot be off when NODE_ENV="):
        s.check_auth()


def test_shards_default_to_one_on_one_redis_and_three_in_cluster_mode() -> None:
    assert settings.load({}, env_file=None).shards == 1
    on = settings.load({"STREAMSVC_REDIS_CLUSTER": "On"}, env_file=None)
    assert on.cluster_on and on.shards == 3
    six = {"STREAMSVC_REDIS_CLUSTER": "on", "STREAMSVC_REDIS_SHARDS": "6"}
    assert settings.load(six, env_file=None).shards == 6


@pytest.mark.parametrize("shards", ["-1", "257", "two"])
def test_a_bad_shard_count_names_the_variable(shards: str) -> None:
    with pytest.raises(ConfigError, match=r"^STREAMSVC_REDIS_SHARDS: "):
        settings.load({"STREAMSVC_REDIS_SHARDS": shards}, env_file=None)


def test_cluster_mode_refuses_a_prefix_with_a_hash_tag_of_its_own() -> None:
    settings.load({"STREAMSVC_REDIS_PREFIX": "{a}"}, env_file=None).check_redis()
    s = settings.load(
        {"STREAMSVC_REDIS_CLUSTER": "on", "STREAMSVC_REDIS_PREFIX": "{a}"}, env_file=None
    )
    with pytest.raises(ConfigError, match=r"^STREAMSVC_REDIS_PREFIX: cannot hold \{ or \}"):
        s.check_redis()


@pytest.mark.parametrize("env", ["development", "test", "productionish", ""])
def test_other_environments_may_switch_auth_off(env: str) -> None:
    s = settings.load({"NODE_ENV": env, "STREAMSVC_AUTH": "off"}, env_file=None)
    assert not s.production
    s.check_auth()


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("", "API_KEY_ENCRYPTION_SECRET: required while STREAMSVC_AUTH=on"),
        ("x" * 31, "API_KEY_ENCRYPTION_SECRET: 31 bytes is too short, at least 32"),
        ("é" * 15, "API_KEY_ENCRYPTION_SECRET: 30 bytes is too short"),  # bytes, not characters
    ],
)
def test_auth_on_needs_a_secret_of_at_least_32_bytes(secret: str, message: str) -> None:
    s = settings.load({"API_KEY_ENCRYPTION_SECRET": secret}, env_file=None)
    with pytest.raises(ConfigError) as info:
        s.check_auth()
    assert str(info.value).startswith(message)
    assert secret not in str(info.value) or not secret  # the secret itself is never shown


@pytest.mark.parametrize("secret", ["x" * 32, "é" * 16])
def test_a_secret_of_32_bytes_is_enough(secret: str) -> None:
    settings.load({"API_KEY_ENCRYPTION_SECRET": secret}, env_file=None).check_auth()


def test_rate_limit_and_stream_cap_settings() -> None:
    s = settings.load({}, env_file=None)
    assert (s.rate_limit_ops, s.stream_maxlen) == (0, 100_000)
    s = settings.load(
        {"STREAMSVC_RATE_LIMIT_OPS": "200", "STREAMSVC_STREAM_MAXLEN": "5000"}, env_file=None
    )
    assert (s.rate_limit_ops, s.stream_maxlen) == (200, 5000)
    with pytest.raises(ConfigError, match=r"^STREAMSVC_STREAM_MAXLEN: expected `int` >= 1"):
        settings.load({"STREAMSVC_STREAM_MAXLEN": "0"}, env_file=None)
    with pytest.raises(ConfigError, match=r"^STREAMSVC_RATE_LIMIT_OPS: expected `int` >= 0"):
        settings.load({"STREAMSVC_RATE_LIMIT_OPS": "-1"}, env_file=None)


@pytest.mark.parametrize(
    ("statement_ms", "lock_ms", "wait_ms"),
    [
        ("60000", "0", 15_000),  # by default a quarter of the statement timeout
        ("60000", "5000", 5_000),
        ("1000", "5000", 999),  # never as long as the statement timeout: a wait ends first
        ("0", "0", 0),  # no statement timeout: no lock timeout either
        ("0", "2000", 2_000),
    ],
)
def test_a_lock_wait_is_bounded_below_the_statement_timeout(
    statement_ms: str, lock_ms: str, wait_ms: int
) -> None:
    env = {"STREAMSVC_STATEMENT_TIMEOUT_MS": statement_ms, "STREAMSVC_LOCK_TIMEOUT_MS": lock_ms}
    assert settings.load(env, env_file=None).lock_wait_ms == wait_ms


def test_schedules_are_parsed_and_a_bad_one_stops_start_up(tmp_path: Path) -> None:
    assert settings.load({}, env_file=None).schedules == {}
    text = '{"purge": {"cron": "0 3 * * *", "operation": {"operationType": "PURGE"}}}'
    s = settings.load({"STREAMSVC_SCHEDULES": text}, env_file=None)
    assert list(s.schedules) == ["purge"]
    path = tmp_path / "schedules.json"
    path.write_text(text, encoding="utf-8")
    s = settings.load({"STREAMSVC_SCHEDULES": f"@{path}"}, env_file=None)
    assert s.schedules["purge"].cron == "0 3 * * *"
    bad = text.replace("0 3 * * *", "0 3 * *")
    with pytest.raises(ConfigError, match=r"^STREAMSVC_SCHEDULES: schedule 'purge': cron: "):
        settings.load({"STREAMSVC_SCHEDULES": bad}, env_file=None)


def test_retention_settings() -> None:
    s = settings.load({}, env_file=None)
    assert (s.retention_days, s.retention_batch, s.retention_s) == (7.0, 1000, 7 * 86_400)
    s = settings.load(
        {"STREAMSVC_RETENTION_DAYS": "0.5", "STREAMSVC_RETENTION_BATCH": "200"}, env_file=None
    )
    assert (s.retention_s, s.retention_batch) == (43_200, 200)
    assert settings.load({"STREAMSVC_RETENTION_DAYS": "0"}, env_file=None).retention_s == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STREAMSVC_RETENTION_DAYS": "-1"}, "STREAMSVC_RETENTION_DAYS: expected `float` >= 0"),
        ({"STREAMSVC_RETENTION_DAYS": "nan"}, "STREAMSVC_RETENTION_DAYS: expected `float` >= 0"),
        ({"STREAMSVC_RETENTION_DAYS": "inf"}, "STREAMSVC_RETENTION_DAYS: expected `float` <="),
        ({"STREAMSVC_RETENTION_DAYS": "week"}, "STREAMSVC_RETENTION_DAYS: expected `float`"),
        ({"STREAMSVC_RETENTION_BATCH": "0"}, "STREAMSVC_RETENTION_BATCH: expected `int` >= 1"),
    ],
)
def test_a_bad_retention_value_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings.load(env, env_file=None)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("name", ["STREAMSVC_GATHER_MS", "STREAMSVC_INTAKE_GATHER_MS"])
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-1", "expected `int` >= 0"),
        ("10001", "expected `int` <= 10000"),
        ("soon", "expected `int`"),
        ("1e9", "expected `int`"),
    ],
)
def test_a_bad_gathering_time_names_the_variable(name: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings.load({name: value}, env_file=None)
    assert str(info.value).startswith(f"{name}: {reason}")


def test_gathering_is_off_at_0_and_20_ms_by_default() -> None:
    assert settings.load({}, env_file=None).gather_ms == 20
    assert settings.load({"STREAMSVC_GATHER_MS": "0"}, env_file=None).gather_ms == 0


def test_the_intakes_gathering_is_off_at_0_and_8_ms_by_default() -> None:
    assert settings.load({}, env_file=None).intake_gather_ms == 8
    loaded = settings.load({"STREAMSVC_INTAKE_GATHER_MS": "0"}, env_file=None)
    assert loaded.intake_gather_ms == 0
