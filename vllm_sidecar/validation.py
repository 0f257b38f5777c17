"""Check adapter names and adapter folders before anything reaches vLLM.

One set of checks serves the sidecar (which stops at the first problem: ``validate_dir``,
``parse_config``, ``check_weights`` raise ``InvalidName`` (400) or ``AdapterInvalid`` (422)) and
``loraroute adapters validate`` / ``push`` (which report every problem at once:
``inspect_dir`` returns an ``Inspection``). Messages and codes are the same in both modes, and
each says what is wrong and what to do. The checks, in order:

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
  inside the file); every tensor's dtype known and its bytes equal to its shape times the
  dtype's size; the tensors covering the data section exactly (no truncated or trailing bytes,
  as the safetensors loader requires); every tensor a LoRA weight (``lora_A``/``lora_B``; vLLM
  refuses others), at least one of them; every LoRA tensor's module in ``target_modules`` (a
  list, or a regex string as PEFT allows); lora_A's first and lora_B's last dimension equal to
  the configured rank.

``discover(paths)`` finds the adapter folders in what an operator points at (an adapter folder,
or a folder of adapter folders) and reports layout mistakes the store would turn into "Adapter
Not Found": an adapter one level too deep, files lying loose beside the adapter folders.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_sidecar.errors import AdapterInvalid, AdapterNotFound, InvalidName, SidecarError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
#: the manifest ``loraroute adapters push`` writes beside an adapter's files (vllm_sidecar.manifest)
MANIFEST_FILE = "loraroute-manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_MAX_HEADER = 100 * 1024 * 1024
#: bytes per element of each safetensors dtype
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` the sidecar uses."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str
    base_model: str | None
    rank_pattern: dict[str, int]

    @property
    def top_rank(self) -> int:
        """The largest rank of any module (``r`` or a ``rank_pattern`` entry)."""
        return max([self.rank, *self.rank_pattern.values()])


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A validated adapter folder."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str
    base_model: str | None
    size_bytes: int
    num_tensors: int


@dataclass(frozen=True, slots=True)
class WeightsSummary:
    """What the safetensors header says: LoRA tensor count and tensors per dtype."""

    num_tensors: int
    dtypes: dict[str, int]


@dataclass(slots=True)
class Inspection:
    """Every finding on one adapter folder (``inspect_dir``); ``problems`` empty means valid."""

    name: str
    folder: Path
    problems: list[SidecarError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: AdapterConfig | None = None
    peft_type: str | None = None
    weights: WeightsSummary | None = None
    files: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def size_bytes(self) -> int:
        return sum(self.files.get(f, 0) for f in REQUIRED_FILES)

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "adapter": self.name,
            "folder": str(self.folder),
            "ok": self.ok,
            "problems": [{"code": p.code, "message": p.message} for p in self.problems],
            "notes": list(self.notes),
            "peft_type": self.peft_type,
            "rank": cfg.top_rank if cfg else None,
            "alpha": cfg.alpha if cfg else None,
            "target_modules": (cfg.target_modules if isinstance(cfg.target_modules, str)
                               else list(cfg.target_modules)) if cfg else None,
            "base_model": cfg.base_model if cfg else None,
            "tensors": self.weights.num_tensors if self.weights else None,
            "dtypes": dict(self.weights.dtypes) if self.weights else None,
            "size_bytes": self.size_bytes,
        }


class _Findings:
    """Where checks put problems: raised at once (the sidecar) or collected (the CLI)."""

    __slots__ = ("collect", "problems")

    def __init__(self, collect: bool) -> None:
        self.collect = collect
        self.problems: list[AdapterInvalid] = []

    def add(self, code: str, message: str) -> None:
        problem = AdapterInvalid(message, code=code)
        if not self.collect:
            raise problem
        self.problems.append(problem)


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


def parse_config(
    raw: bytes,
    *,
    where: str,
    max_lora_rank: int,
    base_model: str | None,
) -> AdapterConfig:
    """Parse and check ``adapter_config.json`` content; ``where`` names it in messages.
    Raises the first problem."""
    config, _peft = _check_config(raw, where, max_lora_rank, base_model, _Findings(collect=False))
    assert config is not None  # a problem would have raised
    return config


def _check_config(
    raw: bytes, where: str, max_lora_rank: int, base_model: str | None, found: _Findings
) -> tuple[AdapterConfig | None, str | None]:
    """(config, peft_type); ``config`` is None when the fields it needs are unusable."""
    try:
        data: Any = json.loads(raw)
    except UnicodeDecodeError:
        found.add("malformed_json", f"{in_folder(where, CONFIG_FILE)} is not UTF-8 text; re-save it as JSON")
        return None, None
    except json.JSONDecodeError as exc:
        found.add("malformed_json", f"{in_folder(where, CONFIG_FILE)} is not valid JSON: {exc.msg} at line {exc.lineno} "
                  f"column {exc.colno}; fix the file (PEFT writes it with save_pretrained)")
        return None, None
    if not isinstance(data, dict):
        found.add("malformed_json", f"{in_folder(where, CONFIG_FILE)} must be a JSON object, found {type(data).__name__}")
        return None, None
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in data or data[k] is None]
    if missing:
        found.add("missing_field", f"{in_folder(where, CONFIG_FILE)} lacks required field(s) {', '.join(missing)} "
                  "(vLLM: 'Missing required configuration fields'); add them as PEFT writes them, "
                  "e.g. \"r\": 16, \"lora_alpha\": 32, \"target_modules\": [\"q_proj\", \"v_proj\"]")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        found.add("peft_type", f"{in_folder(where, CONFIG_FILE)} has peft_type {peft_type!r}; vLLM serves only LoRA "
                  "adapters (peft_type \"LORA\"); export the adapter as LoRA")
    config: AdapterConfig | None = None
    if not missing:
        config = _typed_fields(data, where, found)
    if config is not None:
        top = config.top_rank
        if top > max_lora_rank:
            found.add("rank_too_large", f"adapter rank {top} is above this pod's --max-lora-rank {max_lora_rank}: "
                      f"vLLM would refuse the load ('LoRA rank {top} is greater than max_lora_rank "
                      f"{max_lora_rank}') or run out of memory. Start vLLM with --max-lora-rank {_next_rank(top)} "
                      f"(and the sidecar's max_lora_rank to match) or retrain the adapter with r <= {max_lora_rank}")
    declared = data.get("base_model_name_or_path")
    if base_model is not None and declared != base_model:
        found.add("base_model_mismatch", f"{in_folder(where, CONFIG_FILE)} says base_model_name_or_path {declared!r} but "
                  f"this pod serves {base_model!r} (vLLM's resolver compares them exactly); use an adapter "
                  f"trained for {base_model!r} or set base_model_name_or_path to {base_model!r} if it is "
                  "the same model")
    if data.get("use_dora"):
        found.add("unsupported", f"{where}: DoRA adapters (use_dora: true) are not supported by vLLM; "
                  "retrain without DoRA")
    bias = data.get("bias", "none")
    if bias not in (None, "none"):
        found.add("unsupported", f"{where}: adapter bias {bias!r} is not supported by vLLM; retrain with "
                  "bias=\"none\"")
    modules_to_save = data.get("modules_to_save")
    if modules_to_save not in (None, []) and not set(modules_to_save or []) <= {"classifier", "score"}:
        found.add("unsupported", f"{where}: modules_to_save {modules_to_save!r} is not supported by vLLM "
                  "(only None, 'classifier' or 'score')")
    return config, peft_type if isinstance(peft_type, str) else None


def _typed_fields(data: dict[str, Any], where: str, found: _Findings) -> AdapterConfig | None:
    try:
        rank = int(data["r"])
        alpha = float(data["lora_alpha"])
        pattern = {str(k): int(v) for k, v in (data.get("rank_pattern") or {}).items()}
    except (TypeError, ValueError, AttributeError):
        found.add("missing_field", f"{in_folder(where, CONFIG_FILE)}: r and lora_alpha must be numbers and rank_pattern "
                  "a mapping of module to rank")
        return None
    if rank < 1:
        found.add("missing_field", f"{in_folder(where, CONFIG_FILE)}: r must be a positive integer, found {rank}")
        return None
    targets = data["target_modules"]
    if isinstance(targets, str):
        target_modules: tuple[str, ...] | str = targets
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        target_modules = tuple(targets)
    else:
        found.add("missing_field", f"{in_folder(where, CONFIG_FILE)}: target_modules must be a non-empty list of module "
                  "names (e.g. [\"q_proj\", \"v_proj\"]) or a regex string")
        return None
    declared = data.get("base_model_name_or_path")
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


def _read_header(path: Path, where: str, found: _Findings) -> tuple[dict[str, Any], int] | None:
    """(header, data section length) or None after a problem."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                found.add("safetensors_header", f"{in_folder(where, WEIGHTS_FILE)} is {size} bytes, too short for a "
                          "safetensors file; re-upload it")
                return None
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                found.add("safetensors_header", f"{in_folder(where, WEIGHTS_FILE)} header length {length} does not fit "
                          f"in the {size}-byte file: the file is truncated or not safetensors (a PyTorch "
                          ".bin renamed?); save it with safetensors (PEFT's default)")
                return None
            header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError):
        found.add("safetensors_header", f"{in_folder(where, WEIGHTS_FILE)} has an unreadable header (not JSON); the file "
                  "is damaged or not safetensors; re-export it")
        return None
    if not isinstance(header, dict):
        found.add("safetensors_header", f"{in_folder(where, WEIGHTS_FILE)} header is not a JSON object")
        return None
    return header, size - 8 - length


def check_weights(path: Path, config: AdapterConfig, *, where: str) -> int:
    """Read the safetensors header and match tensor names and shapes to the config.

    Returns the number of LoRA tensors; raises the first problem.
    """
    summary = _check_weights(path, config, where, _Findings(collect=False))
    assert summary is not None
    return summary.num_tensors


def _check_weights(path: Path, config: AdapterConfig | None, where: str, found: _Findings) -> WeightsSummary | None:
    """The header's checks; tensor-to-config checks only when ``config`` is known."""
    read = _read_header(path, where, found)
    if read is None:
        return None
    header, data_len = read
    lora_tensors: list[str] = []
    unmatched: list[str] = []
    rank_mismatch: list[str] = []
    dtypes: dict[str, int] = {}
    spans: list[tuple[int, int]] = []
    targets = config.target_modules if config is not None else None
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            shape = [int(d) for d in meta["shape"]]
            dtype = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            found.add("safetensors_header", f"{in_folder(where, WEIGHTS_FILE)}: tensor {name!r} has no valid "
                      "dtype/data_offsets/shape; re-export the file")
            return None
        if not (0 <= begin <= end <= data_len):
            found.add("safetensors_header", f"{in_folder(where, WEIGHTS_FILE)}: tensor {name!r} points outside the "
                      f"file (bytes {begin}-{end} of {data_len}); the file is truncated, re-upload it")
            return None
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        spans.append((begin, end))
        width = DTYPE_BYTES.get(dtype)
        if width is None:
            found.add("safetensors_header", f"{in_folder(where, WEIGHTS_FILE)}: tensor {name!r} has dtype {dtype!r}, which "
                      f"safetensors does not define (known: {', '.join(sorted(DTYPE_BYTES))}); re-export the file")
        else:
            elements = 1
            for d in shape:
                elements *= d
            if elements * width != end - begin:
                found.add("safetensors_header", f"{in_folder(where, WEIGHTS_FILE)}: tensor {name!r} of shape {shape} and "
                          f"dtype {dtype} needs {elements * width} bytes but occupies {end - begin}; the file is "
                          "damaged, re-export it")
        module = _module_of(name)
        if module is None:
            if "modules_to_save" in name:
                continue
            found.add("tensor_mismatch", f"{in_folder(where, WEIGHTS_FILE)} holds tensor {name!r}, which is not a LoRA "
                      f"weight (no lora_A/lora_B in its name); vLLM refuses it ('{name} is unsupported LoRA "
                      "weight'): re-export the adapter with PEFT's save_pretrained")
            continue
        lora_tensors.append(name)
        if config is None or targets is None:
            continue
        leaf = module.rsplit(".", 1)[-1]
        ok = (re.fullmatch(targets, module) is not None or re.fullmatch(targets, leaf) is not None) \
            if isinstance(targets, str) else leaf in targets
        if not ok:
            unmatched.append(name)
        expected = next((r for key, r in config.rank_pattern.items() if key in module), config.rank)
        if ".lora_A" in name and shape and shape[0] != expected:
            rank_mismatch.append(f"{name} has rank {shape[0]}, config says {expected}")
        elif ".lora_B" in name and len(shape) == 2 and shape[-1] != expected:
            rank_mismatch.append(f"{name} has rank {shape[-1]}, config says {expected}")
    gap = _coverage_gap(spans, data_len)
    if gap:
        found.add("safetensors_header", f"{in_folder(where, WEIGHTS_FILE)}: {gap} (the safetensors loader refuses such a "
                  "file); re-export or re-upload it")
    if not lora_tensors:
        found.add("tensor_mismatch", f"{in_folder(where, WEIGHTS_FILE)} holds no lora_A/lora_B tensors; it is not a LoRA "
                  "adapter's weights (a merged model or the wrong file?)")
    if unmatched:
        listed = targets if isinstance(targets, str) else list(targets or ())
        found.add("tensor_mismatch", f"{in_folder(where, WEIGHTS_FILE)} has tensors for modules not in target_modules "
                  f"{listed}: {', '.join(unmatched[:3])}{' …' if len(unmatched) > 3 else ''}; vLLM would refuse "
                  "them ('expected target modules in ... but received ...'): fix target_modules in "
                  f"{CONFIG_FILE} or re-export the adapter")
    if rank_mismatch:
        found.add("tensor_mismatch", f"{where}: tensor shapes disagree with r in {CONFIG_FILE}: "
                  f"{'; '.join(rank_mismatch[:2])}; the config and the weights come from different adapters")
    return WeightsSummary(len(lora_tensors), dtypes)


def _coverage_gap(spans: list[tuple[int, int]], data_len: int) -> str:
    """What is wrong with how the tensors cover the data section ("" when they cover it exactly)."""
    at = 0
    for begin, end in sorted(spans):
        if begin > at:
            return f"bytes {at}-{begin} of the data section belong to no tensor"
        if begin < at:
            return f"two tensors overlap at byte {begin} of the data section"
        at = end
    if at != data_len:
        return f"{data_len - at} bytes follow the last tensor (data appended, or another file's tail)"
    return ""


def validate_dir(
    folder: Path,
    *,
    where: str,
    max_lora_rank: int,
    base_model: str | None,
    max_adapter_bytes: int,
) -> AdapterInfo:
    """Every check on a local adapter folder; ``where`` is how messages name it. Raises the
    first problem."""
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    for required in REQUIRED_FILES:
        if required not in present:
            raise missing_file_error(where, required, present)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    check_sizes(where, sizes, max_adapter_bytes)
    config = parse_config((folder / CONFIG_FILE).read_bytes(), where=where, max_lora_rank=max_lora_rank,
                          base_model=base_model)
    n = check_weights(folder / WEIGHTS_FILE, config, where=where)
    return AdapterInfo(rank=config.top_rank, alpha=config.alpha,
                       target_modules=config.target_modules, base_model=config.base_model,
                       size_bytes=sum(sizes.values()), num_tensors=n)


def inspect_dir(
    folder: Path,
    *,
    max_lora_rank: int,
    base_model: str | None,
    max_adapter_bytes: int,
    name: str | None = None,
    where: str | None = None,
) -> Inspection:
    """Every check on a local adapter folder, collecting every problem (the same codes and
    messages ``validate_dir`` raises one at a time). Only the two files the store needs count
    towards the size; other files are listed in ``notes``."""
    name = name or folder.name
    where = where or str(folder)
    out = Inspection(name=name, folder=folder)
    try:
        validate_name(name)
    except InvalidName as exc:
        out.problems.append(exc)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    out.files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    for required in REQUIRED_FILES:
        if required not in present:
            out.problems.append(missing_file_error(where, required, present))
    extra = sorted(set(present) - set(REQUIRED_FILES) - {MANIFEST_FILE})
    if extra:
        out.notes.append(f"not part of the adapter (not pushed, vLLM ignores them): {', '.join(extra[:10])}")
    found = _Findings(collect=True)
    sizes = {k: v for k, v in out.files.items() if k in REQUIRED_FILES}
    if sizes:
        try:
            check_sizes(where, sizes, max_adapter_bytes)
        except AdapterInvalid as exc:
            found.problems.append(exc)
    if CONFIG_FILE in out.files:
        out.config, out.peft_type = _check_config((folder / CONFIG_FILE).read_bytes(), where, max_lora_rank,
                                                  base_model, found)
    if WEIGHTS_FILE in out.files:
        out.weights = _check_weights(folder / WEIGHTS_FILE, out.config, where, found)
    out.problems.extend(found.problems)
    return out


def in_folder(where: str, name: str) -> str:
    """``name`` inside the folder ``where`` describes (``s3://b/adapters/sql/`` or a local path),
    with exactly one slash between them."""
    return f"{where.rstrip('/')}/{name}"


def missing_file_error(where: str, required: str, present: list[str]) -> AdapterInvalid:
    found = ", ".join(present[:10]) if present else "nothing"
    hint = ""
    if required == WEIGHTS_FILE and any(p.endswith((".bin", ".pt")) for p in present):
        hint = " (a .bin/.pt file is there: convert it with safetensors, the format the sidecar can verify)"
    return AdapterInvalid(f"{where} has no {required} (found: {found}){hint}; every adapter folder "
                          f"needs {CONFIG_FILE} and {WEIGHTS_FILE}", code="missing_file")


def check_sizes(where: str, sizes: dict[str, int], max_adapter_bytes: int) -> None:
    """``too_large`` when one file or the folder's total exceeds ``max_adapter_bytes``."""
    total = sum(sizes.values())
    if total > max_adapter_bytes:
        biggest = max(sizes, key=lambda k: sizes[k])
        raise AdapterInvalid(f"{where} is {total} bytes ({biggest}: {sizes[biggest]} bytes), above "
                             f"max_adapter_bytes {max_adapter_bytes}; raise max_adapter_bytes if the adapter is "
                             "right, or check that a merged model was not uploaded as an adapter", code="too_large")


# --------------------------------------------------------------------------------------------
# finding adapter folders in what an operator points at
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Found:
    """An adapter folder found by ``discover``; ``problem`` is a layout mistake around it."""

    name: str
    folder: Path
    problem: SidecarError | None = None


def _holds_adapter_files(folder: Path) -> bool:
    return any((folder / f).is_file() for f in REQUIRED_FILES)


def discover(paths: Iterable[Path]) -> list[Found]:
    """Each path is an adapter folder (it holds ``adapter_config.json`` or the weights) or a
    folder of adapter folders (``./local-adapters/`` holding ``sql/``, ``summarize/``).

    A sub-folder that holds no adapter files itself but has one adapter folder inside is one
    level too deep: the store expects ``<prefix><adapter>/adapter_config.json``, so it is
    reported with the move that fixes it. Adapter files lying loose in a folder of adapter
    folders are reported too (a sync of the parent without the folder's name)."""
    out: list[Found] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            out.append(Found(path.name, path, AdapterInvalid(
                f"{path} is not a folder; point at an adapter folder or a folder of adapter folders",
                code="missing_file")))
            continue
        if _holds_adapter_files(path):
            out.append(Found(path.resolve().name, path))
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = sorted(p.name for p in path.iterdir() if p.is_file() and p.name in REQUIRED_FILES)
        if loose:
            out.append(Found(path.resolve().name, path, AdapterInvalid(
                f"{path} holds {', '.join(loose)} beside adapter folders; put them in their own folder named "
                "after the adapter", code="missing_file")))
        if not children and not loose:
            out.append(Found(path.resolve().name, path, missing_file_error(str(path), CONFIG_FILE, [])))
        for child in children:
            if _holds_adapter_files(child):
                out.append(Found(child.name, child))
                continue
            inner = sorted(p for p in child.iterdir() if p.is_dir() and _holds_adapter_files(p))
            if inner:
                deep = inner[0]
                out.append(Found(child.name, child, AdapterNotFound(
                    f"{deep} is one level too deep: the store expects the files of adapter {child.name!r} in "
                    f"{child}/ itself ('<prefix>{child.name}/{CONFIG_FILE}'), so a sidecar would answer "
                    f"Adapter Not Found; move the files of {deep.name}/ up into {child}/")))
            else:
                present = sorted(p.name for p in child.iterdir())
                out.append(Found(child.name, child, missing_file_error(str(child), CONFIG_FILE, present)))
    return out
