"""Drive Debian's chromium headless through the DevTools protocol over a websocket (aiohttp).

``async with Browser.launch(profile_dir, log_dir) as page:`` starts ``chromium --headless`` with a
fresh profile, no background networking, no component updates, no sync, and a DevTools port
chosen by chromium itself (read back from ``DevToolsActivePort``); ``page`` speaks to its first
tab. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from loraroute.procs import Proc, start_process

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--window-size=1440,1000", "--remote-debugging-port=0"]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("chromium is not installed: `make test` installs Debian's chromium package "
                       "(apt-get install chromium)")


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            elif "method" in data:
                await self.events.put(data)

    async def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = future
        await self._ws.send_json({"id": self._next, "method": method, "params": params})
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})  # type: ignore[no-any-return]

    async def navigate(self, url: str, timeout: float = 30.0) -> tuple[int, dict[str, str]]:
        """Load ``url``; returns the HTTP status and headers (lower-case names) of the document.
        Only events of this navigation count (its ``loaderId``): a late load event of the page
        before it is ignored."""
        while not self.events.empty():
            self.events.get_nowait()
        loader = (await self.send("Page.navigate", url=url)).get("loaderId")
        status, headers = 0, {}
        deadline = time.monotonic() + timeout
        while True:
            event = await asyncio.wait_for(self.events.get(), max(0.1, deadline - time.monotonic()))
            params = event["params"]
            if event["method"] == "Network.responseReceived" and params.get("loaderId") == loader \
                    and params["type"] == "Document":
                response = params["response"]
                status = int(response["status"])
                headers = {k.lower(): v for k, v in response["headers"].items()}
            if event["method"] == "Page.loadEventFired" and status:
                return status, headers

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} stayed false for {timeout}s")
            await asyncio.sleep(0.2)

    async def screenshot(self, path: Path, selector: str | None = None) -> bytes:
        """A PNG of the whole page, or of the element ``selector`` matches."""
        if selector is None:
            size = (await self.send("Page.getLayoutMetrics"))["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        else:
            box = await self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                                      ".getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY, "
                                      "width: r.width, height: r.height}; })()")
            clip = {**box, "scale": 1}
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)
        return data

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


class Browser:
    @staticmethod
    @contextlib.asynccontextmanager
    async def launch(profile: Path, log_dir: Path) -> AsyncIterator[Page]:
        profile.mkdir(parents=True, exist_ok=True)
        port_file = profile / "DevToolsActivePort"
        proc: Proc = start_process("chromium", [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   ready=port_file.exists, timeout=60, log_dir=log_dir)
        try:
            port = int(port_file.read_text().split()[0])
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = [t for t in await resp.json(content_type=None) if t.get("type") == "page"]
                ws = await http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
                page = Page(ws)
                try:
                    await page.send("Page.enable")
                    await page.send("Network.enable")
                    yield page
                finally:
                    await page.close()
        finally:
            proc.stop()
