"""Adapter folders validated the way vLLM 0.33 validates them, with vLLM's messages.

Order of checks (``worker_manager._load_adapter`` -> ``PEFTHelper`` -> ``LoRAModel``):

1. ``<path>/adapter_config.json`` missing -> ``AdapterNotFound``:
   ``Loading lora {name} failed: No adapter found for {path}`` (HTTP 404 on the load route).
2. Required fields ``r``, ``lora_alpha``, ``target_modules`` -> ``Missing required configuration
   fields: {...}``.
3. ``validate_legal`` (messages joined by spaces): ``LoRA rank {r} is greater than max_lora_rank
   {N}.`` (r is the max of ``r`` and ``rank_pattern``), ``vLLM does not yet support DoRA.``,
   ``Adapter bias is not supported.``, ``modules_to_save`` other than None / classifier / score.
4. Weights: ``adapter_model.safetensors`` (tensor keys read from its header), else ``.bin`` /
   ``.pt`` (accepted unread), else ``{path} doesn't contain tensors``.
5. Tensor keys name the target modules; a module outside the model's LoRA-capable modules gives
   ``While loading {path}, expected target modules in {...} but received [...]. Please verify
   that the loaded LoRA module is correct``; a key that is not a LoRA weight gives ``{key} is
   unsupported LoRA weight``.

Everything in 2-5 is an engine failure (``AdapterInvalid``, HTTP 500 on the load route with the
prefix ``Call to add_lora method failed: ``). The filesystem resolver (``resolve_from_dir``)
additionally requires ``peft_type == "LORA"`` and ``base_model_name_or_path == --model``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

# LoRA-capable modules of a Llama model in vLLM (packed qkv_proj and gate_up_proj unpacked).
EXPECTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_REQUIRED = ("r", "lora_alpha", "target_modules")
_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


class AdapterNotFound(Exception):
    """No adapter_config.json at the path (vLLM: FileNotFoundError -> 404)."""


class AdapterInvalid(Exception):
    """Any other load failure (vLLM: ValueError inside add_lora -> 500)."""


@dataclass(frozen=True)
class AdapterInfo:
    path: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None
    peft_type: str | None


def _set_repr(items: list[str]) -> str:
    return "{" + ", ".join(repr(i) for i in items) + "}"


def _safetensors_keys(file: str) -> list[str]:
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterInvalid(f"Error while deserializing header: {file} is too small")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise AdapterInvalid("Error while deserializing header: header too large")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise AdapterInvalid(f"Error while deserializing header: {e}") from None
    return [k for k in header if k != "__metadata__"]


def _module_name(key: str) -> str:
    name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    if name.endswith(".bias"):
        return name[: -len(".bias")]
    raise AdapterInvalid(f"{key} is unsupported LoRA weight")


def read_config(path: str) -> dict[str, object]:
    config_file = os.path.join(path, "adapter_config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AdapterNotFound(path) from None
    except (OSError, ValueError) as e:
        raise AdapterInvalid(f"Failed to read {config_file}: {e}") from None
    if not isinstance(data, dict):
        raise AdapterInvalid(f"Failed to read {config_file}: not a JSON object")
    return data


def inspect_adapter(lora_name: str, path: str, max_lora_rank: int) -> AdapterInfo:
    """Validate an adapter folder as vLLM's add_lora does; raise AdapterNotFound/AdapterInvalid."""
    try:
        config = read_config(path)
    except AdapterNotFound:
        raise AdapterNotFound(f"Loading lora {lora_name} failed: No adapter found for {path}") from None
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise AdapterInvalid(f"Missing required configuration fields: {_set_repr(missing)}")
    try:
        rank = int(config["r"])  # type: ignore[arg-type]
        alpha = float(config["lora_alpha"])  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise AdapterInvalid("Invalid LoRA configuration: 'r' and 'lora_alpha' must be numbers") from None
    pattern = config.get("rank_pattern") or {}
    max_rank = max([rank, *[int(v) for v in pattern.values()]]) if isinstance(pattern, dict) else rank
    errors = []
    if max_rank > max_lora_rank:
        errors.append(f"LoRA rank {max_rank} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if config.get("bias", "none") not in ("none", None):
        errors.append("Adapter bias is not supported.")
    to_save = config.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list) and set(to_save) <= {"classifier", "score"}):
        errors.append('vLLM only supports modules_to_save being either None or ["classifier", "score"].')
    if errors:
        raise AdapterInvalid(" ".join(errors))
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        unexpected = []
        for key in _safetensors_keys(st):
            module = _module_name(key)
            if "base_layer" in key:
                continue
            if module.split(".")[-1] not in EXPECTED_MODULES and module not in EXPECTED_MODULES:
                unexpected.append(module)
        if unexpected:
            raise AdapterInvalid(
                f"While loading {path}, expected target modules in {_set_repr(list(EXPECTED_MODULES))} "
                f"but received {unexpected}. Please verify that the loaded LoRA module is correct"
            )
    elif not any(os.path.isfile(os.path.join(path, f)) for f in ("adapter_model.bin", "adapter_model.pt")):
        raise AdapterInvalid(f"{path} doesn't contain tensors")
    targets = config.get("target_modules")
    target_tuple = tuple(targets) if isinstance(targets, list) else (str(targets),)
    base = config.get("base_model_name_or_path")
    peft_type = config.get("peft_type")
    return AdapterInfo(
        path=path, rank=rank, alpha=alpha, target_modules=target_tuple,
        base_model=base if isinstance(base, str) else None,
        peft_type=peft_type if isinstance(peft_type, str) else None,
    )


def resolve_from_dir(cache_dir: str, lora_name: str, base_model_name: str) -> str | None:
    """vLLM's filesystem resolver: ``<dir>/<name>`` if its config says LORA on this exact base."""
    if not lora_name or "/" in lora_name or lora_name in (".", ".."):
        return None
    path = os.path.join(cache_dir, lora_name)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return None
    try:
        config = read_config(path)
    except (AdapterNotFound, AdapterInvalid):
        return None
    if config.get("peft_type") == "LORA" and config.get("base_model_name_or_path") == base_model_name:
        return path
    return None
