"""Load and unload adapters in vLLM through its runtime LoRA API.

``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` registers the adapter and activates it
into a GPU slot (vLLM's ``add_lora``); it needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``.
A 400 "has already been loaded" counts as success (``already_loaded``): vLLM did nothing. Any
other refusal becomes ``LoadRefused`` (502) carrying vLLM's own message. ``inplace=True`` sends
``"load_inplace": true``: vLLM reads the weights of an adapter it already knows under the same
name and id again and activates it — the way to bring back one its CPU cache evicted, and to
swap in a new version without an unload.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from vllm_sidecar.errors import LoadRefused


def _vllm_message(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:500]
        return str(data.get("message") or data.get("detail") or err)[:500]
    return str(data)[:500]


class VllmLoader:
    """Talk to one vLLM server's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``."""

    def __init__(self, vllm_url: str, session: aiohttp.ClientSession, *, timeout_s: float = 300.0) -> None:
        self.vllm_url = vllm_url.rstrip("/")
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def load(self, name: str, path: str, *, inplace: bool = False) -> str:
        """Returns ``"loaded"`` or ``"already_loaded"``; raises ``LoadRefused``."""
        url = f"{self.vllm_url}/v1/load_lora_adapter"
        body: dict[str, object] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        try:
            async with self._session.post(url, json=body, timeout=self._timeout) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise LoadRefused(f"vLLM at {self.vllm_url} did not answer the load of adapter {name!r} "
                              f"({type(exc).__name__}); is the server up?") from None
        if status == 200:
            return "loaded"
        message = _vllm_message(text)
        if status == 400 and "already been loaded" in message:
            return "already_loaded"
        if status == 404 and message in ("Not Found", "{'detail': 'Not Found'}"):
            raise LoadRefused(f"vLLM at {self.vllm_url} has no /v1/load_lora_adapter route: start it with "
                              "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true (and --enable-lora)")
        raise LoadRefused(f"vLLM refused to load adapter {name!r} from {path} (HTTP {status}): {message}")

    async def unload(self, name: str) -> bool:
        """Best effort; True when vLLM confirmed."""
        try:
            async with self._session.post(f"{self.vllm_url}/v1/unload_lora_adapter", json={"lora_name": name},
                                          timeout=self._timeout) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False
