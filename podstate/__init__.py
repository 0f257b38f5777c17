"""The pod-state store: how sidecars tell gateways what each vLLM pod holds.

One interface (``PodStateStore``), two implementations: ``MemoryStore`` (one process, the
embedded default) and ``RedisStore`` (several gateway replicas, sidecars on other hosts).
Readers keep a local view and never touch the network on a request's path. ``open_store`` is the
one place that turns a store URL into a store; ``check_store_url`` is the rule the gateway config
and the sidecar settings both validate ``store.url`` with.
"""

from podstate.memory import MemoryStore
from podstate.store import PodStateStore, StateListener

from urllib.parse import urlsplit

__all__ = ["PodStateStore", "StateListener", "MemoryStore", "STORE_SCHEMES", "check_store_url", "open_store",
           "redact_url"]

#: URL prefixes of the stores: in-process memory, Redis over TCP, TLS or a Unix socket.
STORE_SCHEMES = ("memory:", "redis://", "rediss://", "unix://")


def redact_url(url: str) -> str:
    """``url`` without user name, password, query or fragment: safe for a log line, a message or
    printed settings (``redis://:secret@redis:6379/0`` -> ``redis://redis:6379/0``); ``""`` for
    text without a scheme."""
    parts = urlsplit(url)
    if not parts.scheme:
        return ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def check_store_url(url: str) -> str:
    """``url`` if it names a store ``open_store`` can open, else ``ValueError`` saying what to use."""
    if not url.startswith(STORE_SCHEMES):
        raise ValueError("use memory:// or redis://host:port/db (rediss:// for TLS)")
    return url


def open_store(
    url: str, *, key_prefix: str = "loraroute", reader: bool = True, password: str | None = None
) -> PodStateStore:
    """The store ``url`` names: ``memory://`` (or empty) or ``redis://host:port/db``.

    ``key_prefix``, ``reader`` (False: a writer that keeps no view, like a sidecar) and
    ``password`` (never logged; the URL's own when None) apply to Redis; the memory store has
    no keys, and in one process every writer is also a reader.
    """
    if not url or url.startswith("memory:"):
        return MemoryStore()
    if url.startswith(STORE_SCHEMES):
        from podstate.redis_store import RedisStore

        return RedisStore(url, key_prefix=key_prefix, reader=reader, password=password)
    raise ValueError(f"unknown state store URL scheme in {url!r}; use memory:// or redis://host:port/db")
