"""The live dashboard in headless chromium against a running `loraroute demo`: it refuses without
the admin key, renders data in every panel, and updates by itself when a request is routed.

With LORAROUTE_SCREENSHOTS=<folder> the screenshots docs/operations.md shows are written there
(`LORAROUTE_SCREENSHOTS=docs/operations make test PYTEST_ARGS=tests/test_dashboard.py`)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from pathlib import Path

import httpx
from cdp import Browser

from loraroute.procs import ProcRegistry, free_port, loraroute_cmd

PANELS = ("matrix", "pods", "models", "decisions", "pending", "audit")
BASE = "tsuzumi-base"


def rows(panel: str) -> str:
    return f"Number(document.querySelector('[data-panel=\"{panel}\"] .body').dataset.rows || 0)"


def stream(url: str, model: str, request_id: str | None = None) -> None:
    headers = {"x-request-id": request_id} if request_id else {}
    with httpx.stream("POST", url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": model, "stream": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Summarise the quarterly report"}]}) as resp:
        assert resp.status_code == 200
        for _ in resp.iter_bytes():
            pass


def test_the_dashboard_renders_live_data_and_needs_the_key(procs: ProcRegistry, tmp_path: Path) -> None:
    port = free_port()
    demo = procs.start("demo", loraroute_cmd("demo", "--duration", "150", "--port", str(port), "--time-scale", "0.1"))
    deadline = time.monotonic() + 90
    while "Ctrl-C stops everything" not in demo.log_tail(20000):
        assert demo.alive() and time.monotonic() < deadline, demo.log_tail()
        time.sleep(0.2)
    out = demo.log_tail(20000)
    url = f"http://127.0.0.1:{port}"
    admin = re.search(r"admin key of this run: (\S+)\)", out).group(1)  # type: ignore[union-attr]
    approver = re.search(r"the approver key \((\S+)\) approves", out).group(1)  # type: ignore[union-attr]
    assert f"{url}/dashboard" in out

    for model in ("sql", "sql", "summarize", "creative", "sql"):
        stream(url, f"{BASE}:{model}")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as c:
        applied = c.post("/admin/changes", json={"kind": "pipeline.weights", "weights": {"prefix-cache": 2.0},
                                                 "reason": "longer shared prompts"}).json()
        c.post("/admin/changes", json={"kind": "allowlist.retire", "base": BASE, "adapter": "translate",
                                       "reason": "nobody calls it"}).raise_for_status()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {approver}"}, timeout=30) as c:
        assert c.post(f"/admin/changes/{applied['id']}/approve").json()["status"] == "applied"

    shots = Path(os.environ["LORAROUTE_SCREENSHOTS"]) if os.environ.get("LORAROUTE_SCREENSHOTS") else tmp_path

    async def drive() -> None:
        async with Browser.launch(tmp_path / "profile", tmp_path / "logs") as page:
            status, headers = await page.navigate(url + "/dashboard")
            assert status == 401 and headers["www-authenticate"].startswith('Basic realm="loraroute dashboard"')
            assert await page.evaluate("document.querySelectorAll('[data-panel]').length") == 0

            token = base64.b64encode(f"sre:{admin}".encode()).decode()
            await page.send("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {token}"})
            assert (await page.navigate(url + "/dashboard"))[0] == 200
            await page.wait_for("document.body.dataset.updated")
            await page.wait_for(" && ".join(f"{rows(p)} > 0" for p in PANELS))
            assert await page.evaluate("document.getElementById('status').textContent") == "live"
            tiers = await page.evaluate("[...document.querySelectorAll('[data-adapter=\"sql\"] [data-tier]')]"
                                        ".map(e => e.dataset.tier)")
            assert "gpu" in tiers or "cpu" in tiers, tiers
            models = await page.evaluate("[...document.querySelectorAll('[data-model]')].map(e => e.dataset.model)")
            assert f"{BASE}:sql" in models
            assert "translate" in await page.evaluate("document.querySelector('[data-panel=\"pending\"]').innerText")
            audit = await page.evaluate("document.querySelector('[data-panel=\"audit\"]').innerText")
            assert "approved" in audit and "by approver" in audit
            await page.screenshot(shots / "dashboard.png")

            # a request routed now shows up without a reload
            before = await page.evaluate("document.body.dataset.updated")
            await asyncio.to_thread(stream, url, f"{BASE}:creative", "dash-live-check-1")
            await page.wait_for("document.querySelector('[data-request=\"dash-live-check-1\"]') !== null")
            assert await page.evaluate("document.body.dataset.updated") != before
            panel = await page.evaluate("document.querySelector('[data-request=\"dash-live-check-1\"]').innerText")
            assert f"{BASE}:creative" in panel and "estimated-ttft" in panel
            await page.screenshot(shots / "dashboard-decisions.png", '[data-panel="decisions"]')

            # a wrong key is refused too
            wrong = base64.b64encode(b"sre:not-the-key").decode()
            await page.send("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {wrong}"})
            assert (await page.navigate(url + "/dashboard"))[0] == 401

    asyncio.run(drive())
    refused = httpx.get(url + "/dashboard/state")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_admin_key"
    assert "needs an admin key" in httpx.get(url + "/dashboard").text
    png = (shots / "dashboard.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
