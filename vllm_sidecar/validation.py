"""Check adapter names and adapter folders before anything reaches vLLM.

Every failure raises ``InvalidName`` (400) or ``AdapterInvalid`` (422) whose message says what is
wrong and what to do. The checks, in order:

- name: 1-128 characters from ``[A-Za-z0-9._-]``, no ``..``, not starting with ``.``
  (so it can never leave the adapter folder or collide with temporary folders);
- files: ``adapter_config.json`` and ``adapter_model.safetensors`` present (``too_large`` when a
  file or the sum exceeds ``max_adapter_bytes``);
- config: valid JSON object; ``r``, ``lora_alpha``, ``target_modules`` present (vLLM's
  ``Missing required configuration fields``); ``peft_type == "LORA"`` (vLLM's resolver);
  ``max(r, *rank_pattern) <= max_lora_rank`` (otherwise vLLM refuses the load — or the pod runs
  out of memory); ``base_model_name_or_path`` equal to the served base (exact, as vLLM's
  filesystem resolver compares); no DoRA, no bias, ``modules_to_save`` None/classifier/score;
- weights: the safetensors header readable (8-byte little-endian length, JSON header, offsets
  inside the file); every tensor a LoRA weight (``lora_A``/``lora_B``; vLLM refuses others), at
  least one of them; every LoRA tensor's module in
  ``target_modules`` (a list, or a regex string as PEFT allows); lora_A's first dimension equal
  to the configured rank.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_sidecar.errors import AdapterInvalid, InvalidName

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` the sidecar uses."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str
    base_model: str | None
    rank_pattern: dict[str, int]


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A validated adapter folder."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str
    base_model: str | None
    size_bytes: int
    num_tensors: int


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name, else raise ``InvalidName`` saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidName("adapter name is empty; use letters, digits, '.', '_' or '-'", param="adapter")
    if "/" in name or "\\" in name:
        raise InvalidName(
            f"adapter name {name!r} contains a path separator; name the adapter folder itself "
            "(e.g. 'sql-lora'), not a path", param="adapter")
    if ".." in name:
        raise InvalidName(f"adapter name {name!r} contains '..'; adapter names cannot refer to other folders",
                          param="adapter")
    if name.startswith("."):
        raise InvalidName(f"adapter name {name!r} starts with '.'; hidden names are reserved", param="adapter")
    if not _NAME_RE.match(name):
        bad = sorted({c for c in name if not re.match(r"[A-Za-z0-9._-]", c)})
        detail = f"characters {''.join(bad)!r} are not allowed" if bad else "it is longer than 128 characters"
        raise InvalidName(f"adapter name {name!r} is not valid: {detail}; use only A-Z a-z 0-9 . _ -",
                          param="adapter")
    return name


def _fail(code: str, message: str) -> AdapterInvalid:
    return AdapterInvalid(message, code=code)


def parse_config(
    raw: bytes,
    *,
    where: str,
    max_lora_rank: int,
    base_model: str | None,
) -> AdapterConfig:
    """Parse and check ``adapter_config.json`` content; ``where`` names it in messages."""
    try:
        data: Any = json.loads(raw)
    except UnicodeDecodeError:
        raise _fail("malformed_json", f"{where}/{CONFIG_FILE} is not UTF-8 text; re-save it as JSON") from None
    except json.JSONDecodeError as exc:
        raise _fail("malformed_json", f"{where}/{CONFIG_FILE} is not valid JSON: {exc.msg} at line {exc.lineno} "
                    f"column {exc.colno}; fix the file (PEFT writes it with save_pretrained)") from None
    if not isinstance(data, dict):
        raise _fail("malformed_json", f"{where}/{CONFIG_FILE} must be a JSON object, found {type(data).__name__}")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in data or data[k] is None]
    if missing:
        raise _fail("missing_field", f"{where}/{CONFIG_FILE} lacks required field(s) {', '.join(missing)} "
                    "(vLLM: 'Missing required configuration fields'); add them as PEFT writes them, "
                    "e.g. \"r\": 16, \"lora_alpha\": 32, \"target_modules\": [\"q_proj\", \"v_proj\"]")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise _fail("peft_type", f"{where}/{CONFIG_FILE} has peft_type {peft_type!r}; vLLM serves only LoRA "
                    "adapters (peft_type \"LORA\"); export the adapter as LoRA")
    try:
        rank = int(data["r"])
        alpha = float(data["lora_alpha"])
        pattern = {str(k): int(v) for k, v in (data.get("rank_pattern") or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise _fail("missing_field", f"{where}/{CONFIG_FILE}: r and lora_alpha must be numbers and rank_pattern "
                    "a mapping of module to rank") from None
    if rank < 1:
        raise _fail("missing_field", f"{where}/{CONFIG_FILE}: r must be a positive integer, found {rank}")
    targets = data["target_modules"]
    if isinstance(targets, str):
        target_modules: tuple[str, ...] | str = targets
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        target_modules = tuple(targets)
    else:
        raise _fail("missing_field", f"{where}/{CONFIG_FILE}: target_modules must be a non-empty list of module "
                    "names (e.g. [\"q_proj\", \"v_proj\"]) or a regex string")
    top = max([rank, *pattern.values()])
    if top > max_lora_rank:
        raise _fail("rank_too_large", f"adapter rank {top} is above this pod's --max-lora-rank {max_lora_rank}: "
                    f"vLLM would refuse the load ('LoRA rank {top} is greater than max_lora_rank "
                    f"{max_lora_rank}') or run out of memory. Start vLLM with --max-lora-rank {_next_rank(top)} "
                    f"(and the sidecar's max_lora_rank to match) or retrain the adapter with r <= {max_lora_rank}")
    declared = data.get("base_model_name_or_path")
    if base_model is not None and declared != base_model:
        raise _fail("base_model_mismatch", f"{where}/{CONFIG_FILE} says base_model_name_or_path {declared!r} but "
                    f"this pod serves {base_model!r} (vLLM's resolver compares them exactly); use an adapter "
                    f"trained for {base_model!r} or set base_model_name_or_path to {base_model!r} if it is "
                    "the same model")
    if data.get("use_dora"):
        raise _fail("unsupported", f"{where}: DoRA adapters (use_dora: true) are not supported by vLLM; "
                    "retrain without DoRA")
    bias = data.get("bias", "none")
    if bias not in (None, "none"):
        raise _fail("unsupported", f"{where}: adapter bias {bias!r} is not supported by vLLM; retrain with "
                    "bias=\"none\"")
    modules_to_save = data.get("modules_to_save")
    if modules_to_save not in (None, []) and not set(modules_to_save or []) <= {"classifier", "score"}:
        raise _fail("unsupported", f"{where}: modules_to_save {modules_to_save!r} is not supported by vLLM "
                    "(only None, 'classifier' or 'score')")
    return AdapterConfig(rank=rank, alpha=alpha, target_modules=target_modules,
                         base_model=declared if isinstance(declared, str) else None, rank_pattern=pattern)


def _next_rank(rank: int) -> int:
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if allowed >= rank:
            return allowed
    return rank


def _module_of(tensor: str) -> str | None:
    """``...layers.0.self_attn.q_proj.lora_A.weight`` -> ``...layers.0.self_attn.q_proj``."""
    for marker in (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B"):
        idx = tensor.find(marker)
        if idx > 0:
            return tensor[:idx]
    return None


def check_weights(path: Path, config: AdapterConfig, *, where: str) -> int:
    """Read the safetensors header and match tensor names and shapes to the config.

    Returns the number of LoRA tensors.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail("safetensors_header", f"{where}/{WEIGHTS_FILE} is {size} bytes, too short for a "
                            "safetensors file; re-upload it")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                raise _fail("safetensors_header", f"{where}/{WEIGHTS_FILE} header length {length} does not fit "
                            f"in the {size}-byte file: the file is truncated or not safetensors (a PyTorch "
                            ".bin renamed?); save it with safetensors (PEFT's default)")
            header = json.loads(f.read(length))
    except AdapterInvalid:
        raise
    except (ValueError, UnicodeDecodeError):
        raise _fail("safetensors_header", f"{where}/{WEIGHTS_FILE} has an unreadable header (not JSON); the file "
                    "is damaged or not safetensors; re-export it") from None
    if not isinstance(header, dict):
        raise _fail("safetensors_header", f"{where}/{WEIGHTS_FILE} header is not a JSON object")
    data_len = size - 8 - length
    lora_tensors: list[str] = []
    unmatched: list[str] = []
    rank_mismatch: list[str] = []
    targets = config.target_modules
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            shape = list(meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise _fail("safetensors_header", f"{where}/{WEIGHTS_FILE}: tensor {name!r} has no valid "
                        "data_offsets/shape; re-export the file") from None
        if not (0 <= begin <= end <= data_len):
            raise _fail("safetensors_header", f"{where}/{WEIGHTS_FILE}: tensor {name!r} points outside the "
                        f"file (bytes {begin}-{end} of {data_len}); the file is truncated, re-upload it")
        module = _module_of(name)
        if module is None:
            if "modules_to_save" in name:
                continue
            raise _fail("tensor_mismatch", f"{where}/{WEIGHTS_FILE} holds tensor {name!r}, which is not a LoRA "
                        f"weight (no lora_A/lora_B in its name); vLLM refuses it ('{name} is unsupported LoRA "
                        "weight'): re-export the adapter with PEFT's save_pretrained")
        lora_tensors.append(name)
        leaf = module.rsplit(".", 1)[-1]
        ok = (re.fullmatch(targets, module) is not None or re.fullmatch(targets, leaf) is not None) \
            if isinstance(targets, str) else leaf in targets
        if not ok:
            unmatched.append(name)
        if ".lora_A" in name and shape:
            expected = next((r for key, r in config.rank_pattern.items() if key in module), config.rank)
            if shape[0] != expected:
                rank_mismatch.append(f"{name} has rank {shape[0]}, config says {expected}")
    if not lora_tensors:
        raise _fail("tensor_mismatch", f"{where}/{WEIGHTS_FILE} holds no lora_A/lora_B tensors; it is not a LoRA "
                    "adapter's weights (a merged model or the wrong file?)")
    if unmatched:
        listed = targets if isinstance(targets, str) else list(targets)
        raise _fail("tensor_mismatch", f"{where}/{WEIGHTS_FILE} has tensors for modules not in target_modules "
                    f"{listed}: {', '.join(unmatched[:3])}{' …' if len(unmatched) > 3 else ''}; vLLM would refuse "
                    "them ('expected target modules in ... but received ...'): fix target_modules in "
                    f"{CONFIG_FILE} or re-export the adapter")
    if rank_mismatch:
        raise _fail("tensor_mismatch", f"{where}: tensor shapes disagree with r in {CONFIG_FILE}: "
                    f"{'; '.join(rank_mismatch[:2])}; the config and the weights come from different adapters")
    return len(lora_tensors)


def validate_dir(
    folder: Path,
    *,
    where: str,
    max_lora_rank: int,
    base_model: str | None,
    max_adapter_bytes: int,
) -> AdapterInfo:
    """Every check on a local adapter folder; ``where`` is how messages name it."""
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    for required in REQUIRED_FILES:
        if required not in present:
            raise missing_file_error(where, required, present)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    check_sizes(where, sizes, max_adapter_bytes)
    config = parse_config((folder / CONFIG_FILE).read_bytes(), where=where, max_lora_rank=max_lora_rank,
                          base_model=base_model)
    n = check_weights(folder / WEIGHTS_FILE, config, where=where)
    return AdapterInfo(rank=max([config.rank, *config.rank_pattern.values()]), alpha=config.alpha,
                       target_modules=config.target_modules, base_model=config.base_model,
                       size_bytes=sum(sizes.values()), num_tensors=n)


def missing_file_error(where: str, required: str, present: list[str]) -> AdapterInvalid:
    found = ", ".join(present[:10]) if present else "nothing"
    hint = ""
    if required == WEIGHTS_FILE and any(p.endswith((".bin", ".pt")) for p in present):
        hint = " (a .bin/.pt file is there: convert it with safetensors, the format the sidecar can verify)"
    return _fail("missing_file", f"{where} has no {required} (found: {found}){hint}; every adapter folder "
                 f"needs {CONFIG_FILE} and {WEIGHTS_FILE}")


def check_sizes(where: str, sizes: dict[str, int], max_adapter_bytes: int) -> None:
    """``too_large`` when one file or the folder's total exceeds ``max_adapter_bytes``."""
    total = sum(sizes.values())
    if total > max_adapter_bytes:
        biggest = max(sizes, key=lambda k: sizes[k])
        raise _fail("too_large", f"{where} is {total} bytes ({biggest}: {sizes[biggest]} bytes), above "
                    f"max_adapter_bytes {max_adapter_bytes}; raise max_adapter_bytes if the adapter is right, "
                    "or check that a merged model was not uploaded as an adapter")
