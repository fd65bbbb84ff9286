"""Swagger UI renders in a real headless browser, with nothing fetched from the internet."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest

from benchmarks.harness import ServiceProcess
from tests.conftest import settings_env

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
    "--dump-dom",
]


async def test_swagger_ui_lists_the_operation_endpoints(
    database: str, prefix: str, tmp_path: Path
) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    env = settings_env(database, prefix)
    service = ServiceProcess(env, tmp_path)
    try:
        await service.start()
        url = f"http://127.0.0.1:{env['STREAMSVC_HTTP_PORT']}/api/docs"
        profile = tmp_path / "profile"
        with anyio.fail_after(60):
            done = await anyio.run_process(
                [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", url], check=False
            )
        dom = done.stdout.decode()
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    finally:
        service.stop()
    assert 'class="swagger-ui"' in dom or "swagger-ui" in dom
    for path in ("/api/operations", "/api/operations/batch", "/api/operations/{operation_id}"):
        assert f'data-path="{path}"' in dom, f"{path} not rendered"
    assert "btn authorize" in dom, "no Authorize button: a reader could not send a key"
    for tag in ("operations", "queue", "health"):
        assert f'data-tag="{tag}"' in dom, f"tag {tag} not rendered"
