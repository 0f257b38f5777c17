"""The pod-state store: how sidecars tell gateways what each vLLM pod holds.

One interface (``PodStateStore``), two implementations: ``MemoryStore`` (one process, the
embedded default) and ``RedisStore`` (several gateway replicas, sidecars on other hosts).
Readers keep a local view and never touch the network on a request's path.
"""

from podstate.store import PodStateStore, StateListener
from podstate.memory import MemoryStore

__all__ = ["PodStateStore", "StateListener", "MemoryStore", "open_store"]


def open_store(url: str | None, **kwargs):  # type: ignore[no-untyped-def]
    """Build a store from a URL: ``memory://`` (or empty) or ``redis://host:port/db``."""
    if not url or url.startswith("memory:"):
        return MemoryStore(**kwargs)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from podstate.redis_store import RedisStore

        return RedisStore(url, **kwargs)
    raise ValueError(f"unknown state store URL scheme in {url!r}; use memory:// or redis://host:port/db")
