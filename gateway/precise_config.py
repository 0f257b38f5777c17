"""Config of precise prefix routing: a base's ``tokenizer`` and a static pod's ``kv_events``.

Strict like the rest of ``gateway.config`` (unknown keys are errors naming their path);
docs/config.md has every key with its default, and the measured request-path cost of each mode.

- ``bases[].tokenizer`` — how the gateway turns a request into the token ids the base's pods
  compute (the input of the ``precise-prefix`` scorer, ``gateway.tokens``): ``none`` (the
  default: no token ids, the scorer uses the approximate index), ``sim`` (the simulator's
  pseudo-tokenizer and chat template, exact and local: ``pseudotok``), ``pod`` (ask one of the
  base's pods ``POST /tokenize``, which applies its own chat template, within ``timeout_ms``;
  cached per conversation), ``local`` (a ``tokenizer.json`` and a chat template read from
  ``path``; needs the ``tokenizers`` and ``jinja2`` packages).
- ``discovery.static[].kv_events`` — the pod's KV-event sockets, for a gateway that follows the
  pod's events itself (``gateway.kv_feed``): the one-process set-up (``store.url: memory://``),
  where no sidecar can relay them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerConfig(_Strict):
    """A base's tokenizer for precise prefix routing (module docstring)."""

    mode: Literal["none", "sim", "pod", "local"] = "none"
    #: prompts with fewer characters of routed text are not tokenized (``pod`` and ``local``):
    #: below a few blocks the prefix hardly matters and the call would cost more than it saves
    min_chars: int = Field(1024, ge=0)
    #: ``pod``: bound on one ``/tokenize`` call; past it the request routes on the approximate index
    timeout_ms: float = Field(20.0, gt=0, le=1000.0)
    #: ``pod``: after a failed or late call, seconds before the same pod is asked again
    backoff_s: float = Field(5.0, ge=0)
    #: ``pod`` and ``local``: conversations whose token ids are remembered (least recently used
    #: dropped); 0 turns the cache off
    cache_entries: int = Field(4096, ge=0, le=1_000_000)
    #: ``local``: a folder with ``tokenizer.json`` and the chat template (``chat_template.jinja``
    #: or ``tokenizer_config.json``'s ``chat_template``), the model's own files
    path: str | None = None

    @model_validator(mode="after")
    def _path(self) -> TokenizerConfig:
        if self.mode == "local" and not self.path:
            raise ValueError("mode 'local' needs 'path': the folder with tokenizer.json and the chat template")
        if self.mode != "local" and self.path is not None:
            raise ValueError(f"'path' applies to mode 'local' only, not to {self.mode!r}")
        return self


class StaticKVEvents(_Strict):
    """A pod's ``--kv-events-config`` sockets as the gateway reaches them."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _zmq(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("tcp://", "ipc://")):
            raise ValueError("must be a ZMQ address: tcp://host:port or ipc://path")
        if v is not None and "*" in v:
            raise ValueError("name the pod's address (tcp://10.0.0.5:5557), not the pod's bind address with '*'")
        return v
