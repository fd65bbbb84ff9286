"""Every Prometheus metric of the service, declared once. Labels stay low-cardinality:
no table, caller or operation id ever becomes a label value."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "streamsvc"

received = Counter(
    f"{PREFIX}_operations_received_total", "Operations accepted and stored", ["source"]
)
rejected = Counter(
    f"{PREFIX}_operations_rejected_total", "Operations refused at ingress", ["source"]
)
succeeded = Counter(f"{PREFIX}_operations_succeeded_total", "Operations applied (SUCCESS)")
failed = Counter(f"{PREFIX}_operations_failed_total", "Operations ended as FAIL")
cancelled = Counter(f"{PREFIX}_operations_cancelled_total", "Operations ended as CANCELLED")
scheduled = Counter(
    f"{PREFIX}_operations_scheduled_total", "Operations put on a work stream at their runAt"
)
retried = Counter(
    f"{PREFIX}_operations_retried_total", "Operations retried after a transient error"
)
dead_lettered = Counter(
    f"{PREFIX}_operations_dead_lettered_total", "Operations moved to the dead-letter stream"
)
replayed = Counter(
    f"{PREFIX}_operations_replayed_total", "Finished operations made pending again by a replay"
)
reenqueued = Counter(
    f"{PREFIX}_operations_reenqueued_total", "Operations the sweeper put back on the work stream"
)
flushes = Counter(f"{PREFIX}_flushes_total", "Batch transactions attempted", ["trigger"])
notifications = Counter(
    f"{PREFIX}_notifications_published_total", "Notifications confirmed by RabbitMQ", ["mode"]
)

flush_seconds = Histogram(
    f"{PREFIX}_flush_duration_seconds",
    "Time to apply one batch in one transaction",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SIZES = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
flush_size = Histogram(
    f"{PREFIX}_flush_size_operations", "Operations per batch transaction", buckets=SIZES
)
intake_size = Histogram(
    f"{PREFIX}_intake_size_operations",
    "Operations per intake transaction (the ingress's group commit)",
    buckets=SIZES,
)
relay_size = Histogram(
    f"{PREFIX}_relay_size_outcomes",
    "Outcomes per relay: read from an outcome stream, published and confirmed together",
    buckets=SIZES,
)
latency_seconds = Histogram(
    f"{PREFIX}_end_to_end_latency_seconds",
    "From storage at ingress to the batch commit that finished the operation",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

stream_pending = Gauge(
    f"{PREFIX}_stream_pending_entries", "Entries waiting in a stream", ["stream"]
)
in_flight = Gauge(f"{PREFIX}_operations_in_flight", "Operations held by this process's flushers")
last_success = Gauge(
    f"{PREFIX}_last_success_timestamp_seconds", "Unix time of the last successful batch commit"
)
paused_types = Gauge(
    f"{PREFIX}_paused_operation_types", "operationTypes paused: stored, not applied until resumed"
)
expired = Counter(f"{PREFIX}_operations_expired_total", "Finished operations deleted by retention")
stream_trimmed = Counter(
    f"{PREFIX}_stream_trimmed_entries_total",
    "Entries retention trimmed from the rejects, dead-letter and outcome streams",
    ["stream"],
)
