"""The ``model`` a response carries: the name the client sent, not the adapter name vLLM knows.

vLLM echoes the ``model`` it was sent (``"sql"``, the served adapter name); OpenAI clients and
other gateways expect the name they asked for (``"tsuzumi-base:sql"``). ``ModelEcho`` rewrites
that one value in the bytes as they pass, without decoding or re-encoding the JSON:

- it replaces the exact byte strings ``"model":"<served>"`` and ``"model": "<served>"`` (compact
  and spaced JSON). In JSON text an unescaped ``"model":`` can only be a key, never string
  content, and the closing quote makes ``"sql"`` not match ``"sql-v2"``;
- ``body`` rewrites a whole (non-streamed) body, first occurrence only;
- ``chunk`` rewrites a streamed piece and holds back a tail that could be the start of a match
  cut by the network (only when the piece does not end an SSE event, so in practice never);
  the caller prepends what was held back to the next piece and sends any rest at the end.

Built once per resolved name (``gateway.policy.Resolved.echo``) and shared, so it holds no
per-request state.
"""

from __future__ import annotations

import orjson


class ModelEcho:
    __slots__ = ("served", "client", "_pairs", "_longest")

    def __init__(self, served: str, client: str) -> None:
        self.served = served
        self.client = client
        old, new = orjson.dumps(served), orjson.dumps(client)
        self._pairs = ((b'"model":' + old, b'"model":' + new), (b'"model": ' + old, b'"model": ' + new))
        self._longest = max(len(o) for o, _ in self._pairs)

    def body(self, data: bytes) -> bytes:
        """``data`` with the first echoed model name rewritten."""
        for old, new in self._pairs:
            if old in data:
                return data.replace(old, new, 1)
        return data

    def chunk(self, data: bytes) -> tuple[bytes, bytes]:
        """(bytes ready to send, tail held back because it may be the start of a match)."""
        if b'"model":' in data:  # one scan decides whether the two exact ones are worth looking for
            for old, new in self._pairs:
                if old in data:
                    data = data.replace(old, new)
        if data.endswith(b"\n"):
            return data, b""
        for k in range(min(self._longest - 1, len(data)), 0, -1):
            tail = data[-k:]
            if any(old.startswith(tail) for old, _ in self._pairs):
                return data[:-k], tail
        return data, b""
