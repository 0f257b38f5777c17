"""The pure routing core: data model, plugins, pipeline. No I/O, no asyncio, no HTTP."""

from scorer.model import AdapterRef, Candidate, Decision, PodState, RoutingRequest

__all__ = ["AdapterRef", "Candidate", "Decision", "PodState", "RoutingRequest"]
