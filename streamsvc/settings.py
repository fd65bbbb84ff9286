"""Every setting in one msgspec Struct, read from the environment and a ``.env`` file.

The old NestJS service's variable names work unchanged; new ones carry a STREAMSVC_ prefix.
Units are in the attribute names. A bad value stops start-up with one line that names the
variable and says what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec
from dotenv import dotenv_values

from streamsvc.allowlist import AllowList
from streamsvc.errors import ConfigError
from streamsvc.schedules import Schedule, parse_schedules

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
RoleName = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
OnOff = Literal["on", "off"]
LogLevel = Literal["debug", "info", "warning", "warn", "error", "critical"]
NotifyMode = Literal["operation", "aggregate"]
Days = Annotated[float, msgspec.Meta(ge=0, le=36_500)]  # up to a hundred years


class Route(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where outcomes of one operationType go besides the topic exchange."""

    queue: str
    pattern: str | None = None


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # -- the old service's names ------------------------------------------------------
    node_env: str = msgspec.field(default="development", name="NODE_ENV")
    api_key_secret: str = msgspec.field(default="", name="API_KEY_ENCRYPTION_SECRET")
    redis_url: str = msgspec.field(default="redis://127.0.0.1:6379/0", name="REDIS_URL")
    db_host: str = msgspec.field(default="127.0.0.1", name="DB_HOST")
    db_port: Port = msgspec.field(default=5432, name="DB_PORT")
    db_name: str = msgspec.field(default="postgres", name="DB_NAME")
    db_user: str = msgspec.field(default="postgres", name="DB_USERNAME")
    db_password: str = msgspec.field(default="", name="DB_PASSWORD")
    rmq_url: str = msgspec.field(
        default="amqp://guest:guest@127.0.0.1:5672/", name="BATCH_SERVICE_RMQ_URL"
    )
    rmq_queue: str = msgspec.field(default="batch_service", name="BATCH_SERVICE_RMQ_QUEUE")
    interval_ms: Positive = msgspec.field(default=5000, name="BATCH_PROCESS_OPERATION_INTERVAL")
    batch_limit: Positive = msgspec.field(default=1000, name="BATCH_PROCESS_OPERATION_LIMIT")
    log_level: LogLevel = msgspec.field(default="info", name="LOG_LEVEL")
    # -- streamsvc's own --------------------------------------------------------------
    redis_prefix: str = msgspec.field(default="streamsvc", name="STREAMSVC_REDIS_PREFIX")
    auth: OnOff = msgspec.field(default="on", name="STREAMSVC_AUTH")
    redis_cluster: OnOff = msgspec.field(default="off", name="STREAMSVC_REDIS_CLUSTER")
    # 0: one shard on one Redis, CLUSTER_SHARDS in cluster mode (streamsvc.adapters.streams)
    redis_shards: Annotated[int, msgspec.Meta(ge=0, le=256)] = msgspec.field(
        default=0, name="STREAMSVC_REDIS_SHARDS"
    )
    allowed_tables: str = msgspec.field(default="", name="STREAMSVC_ALLOWED_TABLES")
    caller_role: RoleName = msgspec.field(default="streamsvc_caller", name="STREAMSVC_CALLER_ROLE")
    http_port: Port = msgspec.field(default=3000, name="STREAMSVC_HTTP_PORT")
    http_host: str = msgspec.field(default="0.0.0.0", name="STREAMSVC_HTTP_HOST")
    max_body_bytes: Positive = msgspec.field(default=1_048_576, name="STREAMSVC_MAX_BODY_BYTES")
    flushers: Positive = msgspec.field(default=2, name="STREAMSVC_FLUSHERS")
    # streamsvc.pacing: how long a stage lets work gather between small cycles; at most
    # 10 s (longer would leave outcomes unannounced for that long after every cycle)
    gather_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = msgspec.field(
        default=20, name="STREAMSVC_GATHER_MS"
    )
    # streamsvc.actors.ingress: how long the group commits of concurrent requests gather
    intake_gather_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = msgspec.field(
        default=8, name="STREAMSVC_INTAKE_GATHER_MS"
    )
    db_pool_size: Positive = msgspec.field(default=8, name="STREAMSVC_DB_POOL_SIZE")
    ingress_read_count: Positive = msgspec.field(default=2000, name="STREAMSVC_INGRESS_READ_COUNT")
    inbox_readers: Positive = msgspec.field(default=2, name="STREAMSVC_INBOX_READERS")
    max_attempts: Positive = msgspec.field(default=10, name="STREAMSVC_MAX_ATTEMPTS")
    max_deliveries: Positive = msgspec.field(default=5, name="STREAMSVC_MAX_DELIVERIES")
    claim_idle_ms: Positive = msgspec.field(default=30_000, name="STREAMSVC_CLAIM_IDLE_MS")
    heartbeat_ms: Positive = msgspec.field(default=1000, name="STREAMSVC_HEARTBEAT_MS")
    retry_base_ms: Positive = msgspec.field(default=100, name="STREAMSVC_RETRY_BASE_MS")
    retry_cap_ms: Positive = msgspec.field(default=30_000, name="STREAMSVC_RETRY_CAP_MS")
    shutdown_grace_s: NonNegative = msgspec.field(default=10, name="STREAMSVC_SHUTDOWN_GRACE_S")
    statement_timeout_ms: NonNegative = msgspec.field(
        default=60_000, name="STREAMSVC_STATEMENT_TIMEOUT_MS"
    )
    lock_timeout_ms: NonNegative = msgspec.field(default=0, name="STREAMSVC_LOCK_TIMEOUT_MS")
    rmq_queue_durable: bool = msgspec.field(default=True, name="STREAMSVC_RMQ_QUEUE_DURABLE")
    # RabbitMQ's max_message_size (16 MiB by default in RabbitMQ 4): larger messages are
    # dead-lettered (outcomes) or left unanswered (RPC replies) rather than sent to be refused.
    amqp_max_message_bytes: Positive = msgspec.field(
        default=16 * 1024 * 1024, name="STREAMSVC_AMQP_MAX_MESSAGE_BYTES"
    )
    rpc_prefetch: Positive = msgspec.field(default=256, name="STREAMSVC_RPC_PREFETCH")
    events_exchange: str = msgspec.field(
        default="batch_service.events", name="STREAMSVC_EVENTS_EXCHANGE"
    )
    notify_routes_json: str = msgspec.field(default="{}", name="STREAMSVC_NOTIFY_ROUTES")
    notify_mode: NotifyMode = msgspec.field(default="aggregate", name="STREAMSVC_NOTIFY_MODE")
    rate_limit_ops: NonNegative = msgspec.field(default=0, name="STREAMSVC_RATE_LIMIT_OPS")
    stream_maxlen: Positive = msgspec.field(default=100_000, name="STREAMSVC_STREAM_MAXLEN")
    # Retention (docs/retention.md): finished operations, and rejects and dead letters, older
    # than this many days are deleted (0: kept for good), STREAMSVC_RETENTION_BATCH rows a delete.
    retention_days: Days = msgspec.field(default=7.0, name="STREAMSVC_RETENTION_DAYS")
    retention_batch: Positive = msgspec.field(default=1000, name="STREAMSVC_RETENTION_BATCH")
    schedules_json: str = msgspec.field(default="", name="STREAMSVC_SCHEDULES")
    scheduler_poll_ms: Positive = msgspec.field(default=200, name="STREAMSVC_SCHEDULER_POLL_MS")
    scheduler_lookahead_ms: Positive = msgspec.field(
        default=1000, name="STREAMSVC_SCHEDULER_LOOKAHEAD_MS"
    )

    @property
    def allow_list(self) -> AllowList:
        return AllowList.parse(self.allowed_tables)

    @property
    def notify_routes(self) -> dict[str, Route]:
        try:
            return msgspec.json.decode(self.notify_routes_json, type=dict[str, Route])
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ConfigError(
                f"STREAMSVC_NOTIFY_ROUTES: {exc}; expected "
                '{"OPERATION_TYPE": {"queue": "name", "pattern": "optional"}}'
            ) from None

    @property
    def schedules(self) -> dict[str, Schedule]:
        """Recurring operations by name (streamsvc.schedules); empty when unset. An
        ``@path`` value reads the file on every access."""
        return parse_schedules(self.schedules_json)

    @property
    def lock_wait_ms(self) -> int:
        """How long a batch waits for one lock (lock_timeout) before it lets go and retries:
        STREAMSVC_LOCK_TIMEOUT_MS, by default (0) a quarter of the statement timeout, and
        always below it, so that a wait ends as a lock wait, not as a statement timeout.
        0: no bound, as when there is no statement timeout."""
        timeout = self.statement_timeout_ms
        wait = self.lock_timeout_ms or timeout // 4
        if timeout:
            wait = min(wait, timeout - 1) or 1
        return wait

    @property
    def lookahead_ms(self) -> int:
        """How far ahead a scheduler takes held operations: STREAMSVC_SCHEDULER_LOOKAHEAD_MS,
        at most half the sweep interval, so that an operation a dead scheduler took is
        re-enqueued by the sweeper only after its time (docs/scheduling.md)."""
        return max(1, min(self.scheduler_lookahead_ms, self.interval_ms // 2))

    @property
    def retention_s(self) -> float:
        """How old a finished operation may get, in seconds; 0: kept for good."""
        return self.retention_days * 86_400

    @property
    def auth_on(self) -> bool:
        return self.auth == "on"

    @property
    def production(self) -> bool:
        """NODE_ENV is ``production`` in any spelling (``Production``, `` PRODUCTION``)."""
        return self.node_env.strip().casefold() == "production"

    @property
    def cluster_on(self) -> bool:
        return self.redis_cluster == "on"

    @property
    def shards(self) -> int:
        """How many shards the work and outcome streams are spread over (README, Scaling
        out): STREAMSVC_REDIS_SHARDS, or by default one on one Redis and
        ``CLUSTER_SHARDS`` in cluster mode."""
        if self.redis_shards:
            return self.redis_shards
        return CLUSTER_SHARDS if self.cluster_on else 1

    def check_redis(self) -> None:
        """A prefix holding a brace would make its own hash tag, and put every shard's
        keys in one slot of a cluster: refused in cluster mode."""
        if self.cluster_on and ("{" in self.redis_prefix or "}" in self.redis_prefix):
            raise ConfigError(
                "STREAMSVC_REDIS_PREFIX: cannot hold { or } with STREAMSVC_REDIS_CLUSTER=on "
                "(the service puts each shard's keys under a hash tag of its own)"
            )

    def check_auth(self) -> None:
        """Refuse to serve callers with auth half set up, or off in production."""
        if self.auth_on:
            check_secret(self.api_key_secret, "required while STREAMSVC_AUTH=on")
        elif self.production:
            raise ConfigError("STREAMSVC_AUTH: cannot be off when NODE_ENV=production")


MIN_SECRET_BYTES = 32
CLUSTER_SHARDS = 3  # the smallest cluster's masters, one shard on each


def check_secret(secret: str, why: str) -> None:
    """API_KEY_ENCRYPTION_SECRET must be set and at least 32 bytes of UTF-8 long: every
    key's HMAC is only as strong as it."""
    hint = "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
    if not secret:
        raise ConfigError(f"API_KEY_ENCRYPTION_SECRET: {why} (set a long random value, {hint})")
    size = len(secret.encode())
    if size < MIN_SECRET_BYTES:
        raise ConfigError(
            f"API_KEY_ENCRYPTION_SECRET: {size} bytes is too short, at least "
            f"{MIN_SECRET_BYTES} are required ({hint})"
        )


def env_names() -> tuple[str, ...]:
    """Every variable the service reads, in declaration order."""
    return tuple(f.encode_name for f in msgspec.structs.fields(Settings))


def load(environ: Mapping[str, str] | None = None, env_file: str | None = ".env") -> Settings:
    """Settings from ``environ`` (default: the process environment) over ``env_file``."""
    names = set(env_names())
    raw: dict[str, str] = {}
    if env_file and os.path.exists(env_file):
        raw.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    raw.update(os.environ if environ is None else environ)
    picked = {k: v.strip() for k, v in raw.items() if k in names}
    picked = {k: v.lower() if k in _LOWERED else v for k, v in picked.items()}
    try:
        settings = msgspec.convert(picked, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    settings.allow_list  # noqa: B018 - parse now so a bad value stops start-up
    settings.notify_routes  # noqa: B018
    settings.schedules  # noqa: B018
    return settings


_LOWERED = {
    "LOG_LEVEL",
    "STREAMSVC_AUTH",
    "STREAMSVC_NOTIFY_MODE",
    "STREAMSVC_REDIS_CLUSTER",
    "STREAMSVC_RMQ_QUEUE_DURABLE",
}


def _explain(exc: msgspec.ValidationError) -> str:
    """Turn ``Expected `int`, got `str` - at `$.DB_PORT``` into ``DB_PORT: expected ...``."""
    message = str(exc)
    head, sep, where = message.rpartition(" - at `$.")
    if not sep:
        return f"invalid settings: {message}"
    return f"{where.rstrip('`')}: {head[0].lower()}{head[1:]}"
