"""`loraroute demo --duration`: the README's main-job command works and answers the openai client."""

from __future__ import annotations

import re
import time

import httpx
from openai import OpenAI

from loraroute.procs import free_port, loraroute_cmd


def test_demo_serves_the_printed_examples(procs) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    proc = procs.start("demo", loraroute_cmd("demo", "--duration", "40", "--port", str(port), "--time-scale", "0.1"))
    deadline = time.monotonic() + 60
    while "Ctrl-C stops everything" not in proc.log_tail(20000) and time.monotonic() < deadline:
        assert proc.alive(), proc.log_tail()
        time.sleep(0.1)
    out = proc.log_tail(20000)
    url = re.search(r"gateway on (http://127\.0\.0\.1:\d+)", out).group(1)  # type: ignore[union-attr]
    assert url == f"http://127.0.0.1:{port}"
    assert f"curl -s {url}/v1/chat/completions" in out
    admin_key = re.search(r"admin key of this run: (\S+)\)", out).group(1)  # type: ignore[union-attr]

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    models = [m.id for m in client.models.list()]
    assert "tsuzumi-base:sql" in models and "tsuzumi-base:summarize" in models
    chat = client.chat.completions.create(model="tsuzumi-base:sql", max_tokens=8,
                                          messages=[{"role": "user", "content": "List the tables"}])
    assert chat.model == "tsuzumi-base:sql" and chat.choices[0].message.content  # the name the client sent
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tsuzumi-base:summarize", stream=True, max_tokens=8,
        messages=[{"role": "user", "content": "Summarise this text"}]) if c.choices)
    assert text.strip()
    decisions = httpx.get(url + "/admin/decisions", headers={"Authorization": f"Bearer {admin_key}"}).json()["data"]
    assert [d["model"] for d in decisions[:2]] == ["tsuzumi-base:summarize", "tsuzumi-base:sql"]

    proc.stop(timeout=15)  # SIGTERM: clean shutdown of gateway and cluster
    assert proc.popen.returncode == 0, proc.log_tail()
    assert "loraroute demo: stopped" in proc.log_tail()
