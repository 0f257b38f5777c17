"""A small client for the gateway's admin API, shared by ``loraroute adapters``, ``changes`` and
``doctor``.

The gateway URL and the admin key come from flags or from ``LORAROUTE_GATEWAY`` and
``LORAROUTE_ADMIN_KEY`` (the environment keeps the key out of shell history). Errors become one
``GatewayError`` carrying the HTTP status and the gateway's OpenAI-shaped ``code`` and message;
a connection failure is status 0. The key is sent only as ``Authorization: Bearer`` and never
printed.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import httpx

ENV_URL = "LORAROUTE_GATEWAY"
ENV_KEY = "LORAROUTE_ADMIN_KEY"


class GatewayError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status else "no answer"
        return f"{self.message} ({where}{', ' + self.code if self.code else ''})"


def add_arguments(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--gateway`` and ``--key`` (defaults from the environment)."""
    p.add_argument("--gateway", default=os.environ.get(ENV_URL),
                   help=f"gateway URL, e.g. http://127.0.0.1:8000 (default ${ENV_URL})"
                        + ("" if required else "; optional"))
    p.add_argument("--key", default=os.environ.get(ENV_KEY),
                   help=f"admin key (default ${ENV_KEY}; prefer the variable: flags end up in shell history)")


class GatewayClient:
    def __init__(self, url: str, key: str | None, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
        """The raw response (any status); ``GatewayError(0, ...)`` when the gateway does not answer."""
        try:
            return self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise GatewayError(0, f"the gateway at {self.url} did not answer {method} {path} "
                                  f"({type(exc).__name__})") from None

    def call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """The decoded JSON answer of a 2xx; otherwise ``GatewayError``."""
        resp = self.request(method, path, json=json, params=params)
        if resp.status_code >= 400:
            raise error_of(resp)
        return resp.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, json=body)


def error_of(resp: httpx.Response) -> GatewayError:
    try:
        err = resp.json()["error"]
        return GatewayError(resp.status_code, str(err.get("message")), err.get("code"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return GatewayError(resp.status_code, resp.text[:300] or resp.reason_phrase)
