"""Graceful shutdown: SIGTERM drains the gateway instead of dropping what it is serving.

On the first SIGTERM (or SIGINT) ``DrainingServer`` — uvicorn's server with its exit handler
replaced — runs ``drain(gw, server)``:

1. ``gw.draining_since`` is set: ``GET /ready`` answers 503 ``draining`` at once, so Kubernetes
   takes the pod out of its Service endpoints; requests are still served for
   ``server.drain.grace_s`` (the endpoints and the load balancers in front take a few seconds
   to stop sending any);
2. then the listening sockets close and ``gw.refusing`` makes the completion routes answer
   any request still arriving on an open connection with 503 ``shutting_down``
   (``Connection: close``);
3. requests in flight get ``server.drain.deadline_s`` more to finish; at the deadline every
   attempt still waiting on a pod ends with ``Draining`` (``gw.inflight``): a stream ends with
   the error event and ``[DONE]``, a request without a byte sent gets the 503;
4. uvicorn's own shutdown follows (connections closed, the app's lifespan ends, the gateway
   closes). A second signal exits at once.

The chart sets ``terminationGracePeriodSeconds`` to at least ``grace_s + deadline_s`` and a
margin (helm/loraroute/templates/gateway-deployment.yaml), so the kubelet's SIGKILL never comes
first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import uvicorn

from gateway.failures import Draining
from gateway.service import Gateway

log = logging.getLogger("loraroute.gateway")

#: seconds the streams cut at the deadline get to send their error event before uvicorn closes them
_CUT_S = 2.0


async def drain(gw: Gateway, server: uvicorn.Server) -> None:
    """Steps 1-3 of the module docstring, then ask ``server`` to exit."""
    cfg = gw.runtime.config.server.drain
    gw.draining_since = time.time()
    log.info("draining: /ready answers 503; serving new requests for %gs more, then up to %gs for %d in flight",
             cfg.grace_s, cfg.deadline_s, gw.active_requests)
    await asyncio.sleep(cfg.grace_s)
    gw.refusing = True
    for listener in getattr(server, "servers", []):  # uvicorn's asyncio servers, once started
        listener.close()
    deadline = time.monotonic() + cfg.deadline_s
    while gw.active_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if gw.active_requests:
        cut = gw.inflight.abort_all(Draining)
        log.warning("drain deadline (%gs) passed with %d request(s) in flight; ended %d upstream attempt(s) "
                    "with an error", cfg.deadline_s, gw.active_requests, cut)
        until = time.monotonic() + _CUT_S
        while gw.active_requests and time.monotonic() < until:
            await asyncio.sleep(0.05)
    else:
        log.info("drained: no request in flight")
    server.should_exit = True


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first exit signal drains ``gw`` (``drain``) before exiting."""

    def __init__(self, config: uvicorn.Config, gw: Gateway) -> None:
        super().__init__(config)
        self.gw = gw
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(*args, **kwargs)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None:
            self.force_exit = True  # the second signal: no more waiting
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(drain(self.gw, self), name="drain")
