"""streamsvc's tests. unit/: no servers (fakeredis, the memory store); integration/: the
local PostgreSQL, Redis and RabbitMQ; e2e/: `streamsvc run` as a subprocess.

Where each part of the package is tested (beyond the file named after it):

    actors/ingress.py     integration/test_pipeline.py, test_batches.py, test_per_caller.py,
                          unit/test_ingress_check.py, test_stored_id.py
    actors/flusher.py     unit/test_flusher.py, integration/test_batches.py,
                          test_recovery.py, e2e/test_crashes.py
    actors/sweeper.py     unit/test_sweeper.py, integration/test_recovery.py
    actors/scheduler.py   unit/test_scheduler.py, integration/test_scheduling.py,
                          e2e/test_schedules.py
    actors/notifier.py    unit/test_notifier.py, integration/test_hostile_input.py
    actors/retention.py   unit/test_retention.py, integration/test_retention.py,
                          test_stream_trim.py (adapters/streams.py's trim), e2e/test_retention.py
    api/http.py           integration/test_http.py, test_openapi_fuzz.py, test_cancel.py
    api/console/          unit/test_console_views.py, integration/test_console.py,
                          e2e/test_console_browser.py (headless Chromium, tests/browser.py)
    api/rpc.py, nestjs.py unit/test_rpc.py, integration/test_rpc.py, test_rpc_faults.py,
                          e2e/test_nestjs_interop.py
    api/inbox.py          integration/test_pipeline.py, test_hostile_input.py
    manage.py             unit/test_manage.py, integration/test_queue.py, e2e/test_cli.py,
                          e2e/test_crashes.py (replays racing kills)
    store/                integration/test_scheduling.py, test_cancel.py, test_apply_rows.py
                          (the SQL), unit tests of the actors (the memory store)
    store/listing.py,     unit/test_listing.py, test_store.py, integration/test_per_caller.py,
    filters.py            test_list_plans.py (each shape on its index), e2e/test_cli.py
    adapters/caller_role  integration/test_caller_role.py
    sqlguard, sqlscope    unit/test_sqlguard.py, integration/test_sql_scope.py
    schedules.py          unit/test_schedules.py
    keys.py, ratelimit.py integration/test_keys.py, test_rate_limit.py, test_security.py
    tracing.py            unit/test_tracing.py, integration/test_tracing.py (all three doors)
    logs.py               e2e/test_logs.py (every line of `streamsvc run` is JSON)
    benchmarks/           unit/test_bench_*.py, e2e/test_bench.py, test_baselines.py,
                          e2e/test_soak.py (benchmarks/soak.py)
    actors/heartbeat.py   unit/test_take_over.py, e2e/test_take_over.py
    the whole service     e2e/test_faults.py (kills, cut connections, restarted servers;
                          tests/checker.py), e2e/test_crashes.py
    deploy/k8s            unit/test_k8s.py, test_k8s_keda.py
"""
