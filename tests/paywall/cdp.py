"""A small Chrome DevTools Protocol client: Debian's headless Chromium driven over one WebSocket.

Why raw CDP rather than Selenium or Playwright: it needs nothing beyond the ``chromium`` package and aiohttp (a
dependency already), so there is no driver whose version must match the browser and no Node.js in a Python test
run; and it gives what the paywall tests need and WebDriver does not: ``Runtime.addBinding`` (the injected test
wallet calls into Python to sign), ``Page.addScriptToEvaluateOnNewDocument`` (the wallet exists before the page's
script runs), every network request the page makes, and screenshots.

    async with Chromium.launch(tmp_path) as browser:
        page = await browser.page()
        await page.goto("http://127.0.0.1:8402/cheap")
        title = await page.evaluate("document.title")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

# The flags this machine needs (closed network: no background fetches that fail at every start) plus a fresh
# profile per run. --no-sandbox: the tests run as root in a container, where Chromium's sandbox cannot start.
FLAGS = (
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
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--window-size=1000,1300",
    "--remote-debugging-port=0",
)


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        "Chromium is required for the paywall tests: `make setup` installs it as root (apt-get install chromium)"
    )


class CdpError(RuntimeError):
    pass


class Page:
    """One tab, attached over its own WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self._reader = asyncio.create_task(self._read())
        self.requests: list[str] = []  # every URL the page asked for (Network.requestWillBeSent)
        self.console: list[str] = []
        self.on("Network.requestWillBeSent", lambda p: self.requests.append(p["request"]["url"]))
        self.on("Runtime.consoleAPICalled", self._log_console)
        self.on("Runtime.exceptionThrown", lambda p: self.console.append("exception: " + json.dumps(p)[:500]))

    def _log_console(self, params: dict[str, Any]) -> None:
        self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(CdpError(json.dumps(data["error"])))
                    else:
                        future.set_result(data.get("result", {}))
            else:
                for callback in self._listeners.get(data.get("method", ""), []):
                    callback(data.get("params", {}))

    def on(self, event: str, callback: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.setdefault(event, []).append(callback)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        await self._ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        return await asyncio.wait_for(future, 30)

    async def evaluate(self, expression: str, **params: Any) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True, **params
        )
        if "exceptionDetails" in result:
            raise CdpError(json.dumps(result["exceptionDetails"])[:1000])
        return result["result"].get("value")

    async def goto(self, url: str, timeout: float = 15.0) -> None:
        async def navigate() -> None:
            result = await self.send("Page.navigate", url=url)
            if result.get("errorText"):
                raise CdpError(f"navigation to {url} failed: {result['errorText']}")

        await self.loading(navigate(), timeout)

    async def loading(self, trigger: Awaitable[Any], timeout: float = 15.0) -> None:
        """Run ``trigger`` (a navigation, a form submission) and wait for the next page's load event."""
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(_: dict[str, Any]) -> None:
            if not loaded.done():
                loaded.set_result(None)

        self.on("Page.loadEventFired", done)
        try:
            await trigger
            await asyncio.wait_for(loaded, timeout)
        finally:
            self._listeners["Page.loadEventFired"].remove(done)

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll until ``expression`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {expression}")
            await asyncio.sleep(0.05)

    async def screenshot(self, path: Path) -> None:
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Chromium:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, session: aiohttp.ClientSession) -> None:
        self.proc = proc
        self.port = port
        self.session = session
        self.pages: list[Page] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, profile: Path) -> AsyncIterator[Chromium]:
        profile.mkdir(parents=True, exist_ok=True)
        log = (profile / "chromium.log").open("wb")
        proc = subprocess.Popen(
            [find_chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its renderer and GPU processes go with it
        )
        session = aiohttp.ClientSession()
        browser: Chromium | None = None
        try:
            browser = cls(proc, await _devtools_port(profile, proc), session)
            yield browser
        finally:
            for page in browser.pages if browser else ():
                with contextlib.suppress(Exception):
                    await page.close()
            await session.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            log.close()

    async def page(self) -> Page:
        """A fresh tab, with the Page, Runtime and Network domains enabled."""
        async with self.session.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as resp:
            target = await resp.json(content_type=None)
        ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        self.pages.append(page)
        for domain in ("Page", "Runtime", "Network"):
            await page.send(f"{domain}.enable")
        return page


async def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """Chromium writes the port it picked (``--remote-debugging-port=0``) into the profile once it listens."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}; see {profile / 'chromium.log'}")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        await asyncio.sleep(0.05)
    raise RuntimeError(f"chromium did not open its DevTools port within {timeout} s")
