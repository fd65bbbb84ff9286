"""Headless Chromium driven over the DevTools protocol (CDP), for tests that click.

``--dump-dom`` renders a page but cannot act on it; this starts Chromium with a debugging
port on the loopback, connects to its page over a websocket, and gives tests a few verbs:
go to a URL, type, click where a person would (real mouse events at the element's centre),
wait for a condition, take a screenshot. It records every request the page makes and every
script error or dialog, so a test can assert that nothing left the machine and nothing ran
that should not have. Host names other than 127.0.0.1 do not resolve in it.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import websockets
from anyio.streams.memory import MemoryObjectSendStream

from benchmarks.harness import free_port

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One browser tab, over its CDP websocket."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.ids = itertools.count(1)
        self.waiting: dict[int, MemoryObjectSendStream[dict[str, Any]]] = {}
        self.requests: list[str] = []  # every URL the page asked for
        self.errors: list[str] = []  # uncaught exceptions and console.error calls
        self.refused: list[str] = []  # the browser's own notes of loads that failed
        self.dialogs: list[str] = []  # alert/confirm/prompt messages: none should open

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        sender, receiver = anyio.create_memory_object_stream[dict[str, Any]](1)
        self.waiting[number] = sender
        await self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        with anyio.fail_after(30), receiver:
            answer = await receiver.receive()
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def listen(self) -> None:
        async for raw in self.socket:
            message = json.loads(raw)
            if "id" in message:
                sender = self.waiting.pop(message["id"], None)
                if sender is not None:
                    with sender:
                        sender.send_nowait(message)
                continue
            method, params = message.get("method"), message.get("params", {})
            if method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])
            elif method == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(params["exceptionDetails"])[:2000])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.errors.append(json.dumps(params.get("args"))[:2000])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.refused.append(params["entry"].get("text", ""))
            elif method == "Page.javascriptDialogOpening":
                self.dialogs.append(params.get("message", ""))

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page (awaited when it is a promise)."""
        answer = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, *, within: float = 20.0) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + within
        while not (value := await self.evaluate(expression)):
            if time.monotonic() > deadline:
                text = await self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"not true within {within} s: {expression}\n{text[:3000]}")
            await anyio.sleep(0.1)
        return value

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def click(self, selector: str) -> None:
        """A left click at the centre of the first element ``selector`` matches, once it
        is visible."""
        found = json.dumps(selector)
        box = await self.wait_for(
            f"""(() => {{
                const el = document.querySelector({found});
                if (!el || el.disabled || !el.getClientRects().length) return null;
                el.scrollIntoView({{block: "center"}});
                const r = el.getBoundingClientRect();
                return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
            }})()"""
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box["x"],
                y=box["y"],
                button="left",
                clickCount=1,
            )

    async def type(self, selector: str, text: str) -> None:
        await self.click(selector)
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path, *, width: int, height: int) -> None:
        """The viewport at ``width`` x ``height`` CSS pixels (narrow ones as a phone), as PNG."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )
        await self.evaluate("new Promise(r => requestAnimationFrame(() => setTimeout(r, 300)))")
        shot = await self.send("Page.captureScreenshot", format="png")
        await anyio.Path(path).write_bytes(base64.b64decode(shot["data"]))
        await self.send("Emulation.clearDeviceMetricsOverride")


@asynccontextmanager
async def open_page(profile: Path) -> AsyncIterator[Page]:
    """A fresh headless Chromium with its profile in ``profile``, and its one tab."""
    browser = chromium()
    assert browser is not None, "chromium is not installed"
    port = free_port()
    process = await anyio.open_process(
        [
            browser,
            *FLAGS,
            f"--remote-debugging-port={port}",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        target = await _first_page(port)
        async with (
            websockets.connect(target, max_size=None) as socket,
            anyio.create_task_group() as tg,
        ):
            page = Page(socket)
            tg.start_soon(page.listen)
            for domain in ("Page", "Network", "Runtime", "Log"):
                await page.send(f"{domain}.enable")
            try:
                yield page
            finally:
                tg.cancel_scope.cancel()
    finally:
        process.terminate()
        with anyio.move_on_after(10) as waited:
            await process.wait()
        if waited.cancelled_caught:
            process.kill()
            await process.wait()
        await process.aclose()


async def _first_page(port: int, within: float = 30.0) -> str:
    """The websocket URL of the browser's first tab, once its debugging port answers."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient() as client:
        while True:
            try:
                targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"chromium's debugging port {port} did not answer")
            await anyio.sleep(0.1)
