"""Model names as clients write them: ``<base>:<adapter>``, or a bare ``<base>`` for the base model.

Rules (each violation is a 400 whose message names the problem):

- at most ``MAX_MODEL_NAME_CHARS`` characters (the longest base name, a colon and the longest
  adapter name), checked before anything else looks at the name: a megabyte of model name costs
  one ``len``, is never cached and never echoed;
- no whitespace and no control characters anywhere;
- at most one colon; neither side of the colon empty;
- the adapter part matches ``gateway.config.ADAPTER_NAME_RE`` — letters, digits, ``.``, ``_``, ``-``,
  starting with a letter or digit, at most 128 characters — and never contains ``..`` or ``/``.

Whether the base and adapter exist, and whether the caller may use them, is ``gateway.policy``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ADAPTER_NAME_RE
from gateway.errors import APIError

#: a base name (256 characters at most), a colon, an adapter name (128 at most)
MAX_MODEL_NAME_CHARS = 256 + 1 + 128


@dataclass(frozen=True, slots=True)
class ModelName:
    base: str
    adapter: str | None

    def __str__(self) -> str:
        return self.base if self.adapter is None else f"{self.base}:{self.adapter}"


def _bad(message: str) -> APIError:
    return APIError(400, message, param="model", code="invalid_model_name")


def not_a_string() -> APIError:
    return _bad("'model' must be a string such as 'base' or 'base:adapter'")


def check_length(name: str) -> None:
    """Raises ``APIError(400)`` for a name longer than ``MAX_MODEL_NAME_CHARS``."""
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise _bad(f"'model' is {len(name)} characters long; model names are at most {MAX_MODEL_NAME_CHARS} "
                   "characters ('base' or 'base:adapter')")


def parse_model_name(name: object) -> ModelName:
    """Split and check a client's ``model`` value. Raises ``APIError(400)`` saying what is wrong."""
    if not isinstance(name, str):
        raise not_a_string()
    if not name:
        raise _bad("'model' is empty; use 'base' or 'base:adapter'")
    check_length(name)
    for ch in name:
        if ch.isspace():
            raise _bad(f"model name {name!r} contains whitespace; names are 'base' or 'base:adapter' without spaces")
        if ord(ch) < 32 or ord(ch) == 127:
            raise _bad(f"model name contains a control character (U+{ord(ch):04X}); remove it")
    base, sep, adapter = name.partition(":")
    if not sep:
        return ModelName(base, None)
    if ":" in adapter:
        raise _bad(f"model name {name!r} has a second colon; use exactly one: 'base:adapter'")
    if not base:
        raise _bad(f"model name {name!r} has an empty base part before the colon; use 'base:adapter'")
    if not adapter:
        raise _bad(f"model name {name!r} has an empty adapter part after the colon; use 'base:adapter' or just 'base'")
    if ".." in adapter:
        raise _bad(f"adapter name {adapter!r} contains '..'; adapter names cannot contain '..'")
    if "/" in adapter or "\\" in adapter:
        raise _bad(f"adapter name {adapter!r} contains a path separator; adapter names cannot contain '/'")
    if not ADAPTER_NAME_RE.match(adapter):
        raise _bad(
            f"adapter name {adapter!r} is not valid: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return ModelName(base, adapter)
