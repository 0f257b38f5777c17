"""The pooled HTTP client to vLLM pods and sidecars (aiohttp).

One ``aiohttp.ClientSession`` with a ``TCPConnector`` keeps up to ``server.pool_per_pod``
keep-alive connections per pod (``limit_per_host``; no global limit). aiohttp was chosen over
httpx by measurement (docs/gateway.md, "Overhead"): its per-request client cost is lower.
Responses are read with ``content.readany()`` — bytes as they arrive, never decoded.
"""

from __future__ import annotations

import aiohttp

from gateway.config import ServerConfig


class Upstream:
    def __init__(self, server: ServerConfig) -> None:
        self._server = server
        self.session: aiohttp.ClientSession | None = None
        self.configure(server)

    def configure(self, server: ServerConfig) -> None:
        """Apply (re)loaded timeouts; the pool itself keeps its size until restart."""
        self._server = server
        t = server.timeouts
        # total covers the whole exchange incl. reading the body; first-byte is enforced by the
        # proxy around headers + first chunk.
        self.timeout = aiohttp.ClientTimeout(total=t.total_s, connect=None, sock_connect=t.connect_s)
        self.ensure_timeout = aiohttp.ClientTimeout(total=t.ensure_s, sock_connect=t.connect_s)
        self.first_byte_s = t.first_byte_s
        self.retries = server.retries

    async def start(self) -> None:
        if self.session is None:
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=self._server.pool_per_pod, keepalive_timeout=60.0, ttl_dns_cache=300
            )
            self.session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
