"""The one object a completion request carries through the stages, and the ASGI types they share.

``Exchange`` is created by the edge when a request arrives and handed to each stage in turn
(``gateway.edge`` → ``parse`` → ``route`` → ``forward`` → ``relay``; docs/gateway.md walks
through them). The fields in the first block are known on arrival; the rest are filled by the
stage named beside them and are unset (reading one raises ``AttributeError``) until then, so a
stage that reads a field an earlier stage has not filled fails loudly in tests, not silently in
production.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from gateway.parse import Kind, ParsedRequest
from gateway.policy import Resolved, Tenant
from gateway.service import DecisionRecord, Runtime
from scorer.model import Decision, RoutingRequest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(slots=True, eq=False)
class Exchange:
    """What one completion request accumulates; see the module docstring."""

    kind: Kind
    runtime: Runtime  # the config snapshot the whole request runs on, even across a reload
    arrived: float  # time.perf_counter() on arrival: every latency is measured from here
    request_id: str | None = None  # the client's x-request-id, when it is safe to forward
    session: str | None = None  # the session-affinity header's value
    explain: bool = False  # the caller asked for x-loraroute-explain and may have it
    # labels of the metrics this request counts in (set by route.resolve once the name is known)
    base_label: str = ""
    adapter_label: str = ""
    # filled by the stages, in order
    tenant: Tenant | None = field(init=False, repr=False)  # edge: None when the gateway is open
    request: ParsedRequest = field(init=False, repr=False)  # parse
    resolved: Resolved = field(init=False, repr=False)  # route.resolve
    routing: RoutingRequest = field(init=False, repr=False)  # route.resolve
    body: bytes = field(init=False, repr=False)  # route.resolve: the JSON sent to the pod
    decision: Decision = field(init=False, repr=False)  # route.decide
    record: DecisionRecord = field(init=False, repr=False)  # route.decide
    # the client's side, and the outcome (set by whichever stage answers the client)
    responded: bool = False  # the response has started: nothing can be retried or replaced now
    client_gone: bool = False  # the client disconnected before the response was complete
    status: int = 0  # HTTP status sent (499: the client went away)
    pod: str = ""  # the pod that answered (or, on an error, the last one tried)
    ttft_s: float | None = None  # relay: seconds from arrival to the first streamed byte
    first_byte_at: float | None = None  # relay: time.perf_counter() when the first streamed byte went out
