"""Sampling parameters checked as vLLM checks them, with vLLM's 400 bodies.

Two steps, in vLLM's order:

1. ``check_types(body)`` — what pydantic's request model refuses before anything else runs
   (FastAPI's ``RequestValidationError``, answered 400 with the validation message, before the
   model is looked up): a number field that is not a number (``"temperature": "hot"``), an
   integer field with a fraction, ``stop`` that is neither a string nor a list of strings
   (``"stop": 5``: two errors, one per member of the union), ``stream`` not a boolean.
   Returns the error list (pydantic's dicts: ``type``, ``loc``, ``msg``, ``input``), empty when
   the types are right. Lax like pydantic: ``2`` and ``"0.5"`` are numbers, ``1.0`` an integer.
2. ``check_ranges(body)`` — ``SamplingParams._verify_args``' ``VLLMValidationError``s, answered
   400 ``BadRequestError``: (message, param) of the first value out of range, or None. A message
   of an error raised with a parameter ends with ``(parameter=…, value=…)``, as vLLM's
   ``str()`` of it does, and ``param`` names it.

Ranges (vLLM's): temperature in [0, 2], top_p in (0, 1], top_k ≥ -1 (0 or -1 disable it),
min_p in [0, 1], presence_penalty and frequency_penalty in [-2, 2], repetition_penalty > 0,
min_tokens ≥ 0 and ≤ max_tokens, no empty stop string. ``max_tokens`` and ``n`` are checked by
the server itself.
"""

from __future__ import annotations

import math
from typing import Any

_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_INTS = ("top_k", "min_tokens", "seed", "n")
#: what pydantic's lax mode reads as a boolean besides true and false
_BOOLS = (0, 1, "0", "1", "true", "false", "True", "False", "yes", "no", "on", "off", "t", "f", "y", "n")


def _number(value: Any) -> float | None:
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _float_error(key: str, value: Any) -> dict[str, Any] | None:
    if value is None or _number(value) is not None:
        return None
    if isinstance(value, str):
        return {"type": "float_parsing", "loc": ("body", key),
                "msg": "Input should be a valid number, unable to parse string as a number", "input": value}
    return {"type": "float_type", "loc": ("body", key), "msg": "Input should be a valid number", "input": value}


def _int_error(key: str, value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, bool | int):
        return None
    number = _number(value)
    if number is None:
        kind, msg = (("int_parsing", "Input should be a valid integer, unable to parse string as an integer")
                     if isinstance(value, str) else ("int_type", "Input should be a valid integer"))
        return {"type": kind, "loc": ("body", key), "msg": msg, "input": value}
    if not math.isfinite(number) or number != int(number):
        return {"type": "int_from_float", "loc": ("body", key),
                "msg": "Input should be a valid integer, got a number with a fractional part", "input": value}
    return None


def check_types(body: dict[str, Any]) -> list[dict[str, Any]]:
    """pydantic's errors for the sampling fields of ``body`` (see the module docstring)."""
    errors: list[dict[str, Any]] = []
    for key in _FLOATS:
        err = _float_error(key, body.get(key))
        if err is not None:
            errors.append(err)
    for key in _INTS:
        err = _int_error(key, body.get(key))
        if err is not None:
            errors.append(err)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if isinstance(stop, list):
            errors.extend({"type": "string_type", "loc": ("body", "stop", "list[str]", i),
                           "msg": "Input should be a valid string", "input": s}
                          for i, s in enumerate(stop) if not isinstance(s, str))
        else:
            errors.append({"type": "string_type", "loc": ("body", "stop", "str"),
                           "msg": "Input should be a valid string", "input": stop})
            errors.append({"type": "list_type", "loc": ("body", "stop", "list[str]"),
                           "msg": "Input should be a valid list", "input": stop})
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool) and stream not in _BOOLS:
        errors.append({"type": "bool_parsing" if isinstance(stream, str) else "bool_type", "loc": ("body", "stream"),
                       "msg": "Input should be a valid boolean", "input": stream})
    return errors


def _with_param(message: str, param: str, value: float) -> tuple[str, str]:
    return f"{message} (parameter={param}, value={value})", param


def check_ranges(body: dict[str, Any], max_tokens: int | None) -> tuple[str, str | None] | None:
    """(message, param) of the first sampling value out of vLLM's range, or None (the types
    are already right: ``check_types``)."""
    def get(key: str, default: float) -> float:
        value = body.get(key)
        number = _number(value) if value is not None else None
        return default if number is None else number

    presence, frequency = get("presence_penalty", 0.0), get("frequency_penalty", 0.0)
    if not -2.0 <= presence <= 2.0:
        return f"presence_penalty must be in [-2, 2], got {presence}.", None
    if not -2.0 <= frequency <= 2.0:
        return f"frequency_penalty must be in [-2, 2], got {frequency}.", None
    repetition = get("repetition_penalty", 1.0)
    if not math.isfinite(repetition):
        return f"repetition_penalty must be a finite number, got {repetition}.", None
    if repetition <= 0.0:
        return f"repetition_penalty must be greater than zero, got {repetition}.", None
    temperature = get("temperature", 1.0)
    if not math.isfinite(temperature):
        return _with_param(f"temperature must be a finite number, got {temperature}.", "temperature", temperature)
    if temperature < 0.0:
        return _with_param(f"temperature must be non-negative, got {temperature}.", "temperature", temperature)
    if temperature > 2.0:
        return _with_param(f"temperature must be in [0, 2], got {temperature}.", "temperature", temperature)
    top_p = get("top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        return _with_param(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
    top_k = int(get("top_k", 0))
    if top_k < -1:
        return f"top_k must be 0 (disable), or at least 1, got {top_k}.", None
    min_p = get("min_p", 0.0)
    if not 0.0 <= min_p <= 1.0:
        return f"min_p must be in [0, 1], got {min_p}.", None
    min_tokens = int(get("min_tokens", 0))
    if min_tokens < 0:
        return f"min_tokens must be greater than or equal to 0, got {min_tokens}.", None
    if max_tokens is not None and min_tokens > max_tokens:
        return f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.", None
    stop = body.get("stop")
    if (stop == "") or (isinstance(stop, list) and any(s == "" for s in stop)):
        return "stop cannot contain an empty string.", None
    return None
