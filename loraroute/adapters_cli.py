"""``loraroute adapters``: validate, diff, push and list adapters in an S3 / MinIO bucket.

- ``validate DIR…`` — every problem of every adapter folder, exactly as a sidecar would report it
  (``vllm_sidecar.validation``: the same checks, codes and messages), with the fix.
- ``diff DIR s3://bucket/prefix/`` — new / changed / unchanged / only in the store, by checksum;
  ``--plan FILE`` writes the plan a ``push --delete`` needs.
- ``push DIR… s3://bucket/prefix/`` — validates first (nothing is uploaded when one adapter has a
  problem), uploads each version to its own immutable folder with a sha256 per file in a
  manifest, then publishes it into the live folder so that no sidecar fetching at the same time
  sees half of it (``loraroute.bucket``); idempotent (unchanged adapters are skipped), never
  deletes — unless ``--delete`` is given with the ``--plan`` of a ``diff`` run (or ``--yes``),
  and then only adapters that no allowlist names (``--force`` overrides), after printing them.
- ``ls s3://bucket/prefix/`` — names, versions, ranks, sizes, checksums; with ``--gateway`` and an
  admin key, where each adapter is resident right now (GPU / CPU / disk / loading per pod).

S3 settings are the sidecar's (``--sidecar-config`` reads a sidecar settings file; the
``LORAROUTE_SIDECAR_*`` variables and the flags below override it): endpoint, region, CA bundle,
TLS verification, credential files or ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``. The
limits validation checks against (``max_lora_rank``, ``base_model``, ``max_adapter_bytes``) come
from the same file or flags. ``--json`` prints one JSON document on stdout. Exit status: 0 done,
1 a problem (invalid adapter, refused delete, store error), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraroute.bucket import AdapterBucket, RemoteAdapter, S3Url
from loraroute.gateway_client import GatewayClient, GatewayError
from loraroute.gateway_client import add_arguments as add_gateway_arguments
from vllm_sidecar import manifest
from vllm_sidecar.errors import SidecarError
from vllm_sidecar.settings import SettingsError, SidecarSettings, load_settings, read_file
from vllm_sidecar.validation import Inspection, discover, inspect_dir

#: vLLM's largest --max-lora-rank: the limit checked when no pod's limit is given
_ANY_RANK = 512
PLAN_FORMAT = 1


class UsageError(Exception):
    """Bad arguments or settings: exit status 2."""


class Refused(Exception):
    """The command will not do what was asked (a problem the operator must fix): exit status 1."""


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Limits:
    max_lora_rank: int
    base_model: str | None
    max_adapter_bytes: int
    checked: bool  # False: no pod's limits were given, only vLLM's own maximum was checked


def settings_from(args: argparse.Namespace) -> SidecarSettings:
    data: dict[str, Any] = read_file(args.sidecar_config) if args.sidecar_config else {}
    data.setdefault("pod_id", "loraroute-adapters")
    data.setdefault("vllm_url", "http://127.0.0.1")
    overrides: dict[str, Any] = {}
    for flag, key in (("endpoint_url", "source.s3.endpoint_url"), ("region", "source.s3.region"),
                      ("ca_bundle", "source.s3.ca_bundle"), ("max_lora_rank", "max_lora_rank"),
                      ("base_model", "base_model"), ("max_adapter_bytes", "max_adapter_bytes")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "no_verify_tls", False):
        overrides["source.s3.verify_tls"] = False
    try:
        return load_settings(data, env=os.environ, overrides=overrides)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


def limits_from(args: argparse.Namespace, settings: SidecarSettings) -> Limits:
    checked = bool(args.sidecar_config or args.max_lora_rank is not None)
    return Limits(settings.max_lora_rank if checked else _ANY_RANK, settings.base_model,
                  settings.max_adapter_bytes, checked)


def bucket_from(args: argparse.Namespace, settings: SidecarSettings, url_text: str) -> AdapterBucket:
    try:
        url = S3Url.parse(url_text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return AdapterBucket(url, settings.source.s3)


def check_layout(url: S3Url, settings: SidecarSettings, given: bool) -> str | None:
    """The sidecar looks for ``layout`` in its bucket: a push elsewhere is the seed's "Adapter
    Not Found" accident. Returns the problem, or None."""
    if not given:
        return None
    s3 = settings.source.s3
    marker = "\x00"
    expected = s3.layout.format(adapter=marker, base=settings.base_key).split(marker, 1)[0]
    if url.bucket != s3.bucket or url.prefix != expected:
        return (f"the sidecars look for adapters in s3://{s3.bucket}/{s3.layout} ({expected or '/'}<adapter>/ "
                f"for this base), not in {url}<adapter>/: they would answer Adapter Not Found. Push to "
                f"s3://{s3.bucket}/{expected}, or fix source.s3.layout (pass --force to push anyway)")
    return None


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _targets(inspection: Inspection) -> str:
    cfg = inspection.config
    if cfg is None:
        return "?"
    return cfg.target_modules if isinstance(cfg.target_modules, str) else ",".join(cfg.target_modules)


class Progress:
    """Transfer progress on stderr: a bar redrawn in place on a terminal, one line per finished
    file otherwise; nothing with ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._lock = threading.Lock()

    def file(self, label: str, size: int) -> Callable[[int], None]:
        done = 0
        started = time.monotonic()
        last_draw = 0.0

        def callback(nbytes: int) -> None:
            nonlocal done, last_draw
            if self.quiet:
                return
            with self._lock:
                done += nbytes
                now = time.monotonic()
                finished = done >= size
                if self.tty and (finished or now - last_draw > 0.1):
                    last_draw = now
                    width = 30
                    filled = int(width * done / size) if size else width
                    sys.stderr.write(f"\r  {label:<48} [{'#' * filled}{'.' * (width - filled)}] "
                                     f"{100 * done / max(size, 1):3.0f}% {_size(done)}/{_size(size)}")
                    if finished:
                        sys.stderr.write("\n")
                    sys.stderr.flush()
                elif not self.tty and finished:
                    seconds = max(now - started, 1e-6)
                    sys.stderr.write(f"  uploaded {label} ({_size(size)}, {_size(int(size / seconds))}/s)\n")
                    sys.stderr.flush()

        return callback


def _emit(args: argparse.Namespace, document: Any, text: list[str]) -> None:
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print("\n".join(text))


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------
def inspect_all(paths: list[str], limits: Limits) -> list[Inspection]:
    found = discover(Path(p) for p in paths)
    out: list[Inspection] = []
    for item in found:
        if item.problem is not None:
            out.append(Inspection(name=item.name, folder=item.folder, problems=[item.problem]))
            continue
        out.append(inspect_dir(item.folder, name=item.name, max_lora_rank=limits.max_lora_rank,
                               base_model=limits.base_model, max_adapter_bytes=limits.max_adapter_bytes))
    names = [i.name for i in out]
    for i in out:
        if names.count(i.name) > 1:
            i.problems.append(SidecarError(f"two folders are named {i.name!r}; adapter names must be unique",
                                           code="duplicate_name"))
    return out


def _limits_note(limits: Limits) -> str:
    if limits.checked:
        return (f"checked against max_lora_rank {limits.max_lora_rank}, base model "
                f"{limits.base_model or '(not checked)'}, max_adapter_bytes {limits.max_adapter_bytes}")
    return (f"checked against vLLM's largest --max-lora-rank {_ANY_RANK} only: pass --sidecar-config (the "
            "sidecar's settings) or --max-lora-rank/--base-model to check against your pods")


def validation_lines(inspections: list[Inspection]) -> list[str]:
    lines = []
    for i in inspections:
        if i.ok:
            dtypes = ",".join(f"{d}x{n}" for d, n in sorted((i.weights.dtypes if i.weights else {}).items()))
            cfg = i.config
            lines.append(f"  OK    {i.name:<20} rank {cfg.top_rank if cfg else '?'}, alpha "
                         f"{cfg.alpha if cfg else '?':g}, targets {_targets(i)}, "
                         f"{i.weights.num_tensors if i.weights else 0} tensors ({dtypes}), {_size(i.size_bytes)}, "
                         f"base {cfg.base_model if cfg else '?'}")
        else:
            lines.append(f"  FAIL  {i.name:<20} {len(i.problems)} problem(s) in {i.folder}")
            for p in i.problems:
                lines.append(f"        - [{p.code}] {p.message}")
        for note in i.notes:
            lines.append(f"        note: {note}")
    return lines


def cmd_validate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    limits = limits_from(args, settings)
    inspections = inspect_all(args.dirs, limits)
    bad = [i for i in inspections if not i.ok]
    _emit(args, {"ok": not bad, "limits": {"max_lora_rank": limits.max_lora_rank, "base_model": limits.base_model,
                                           "max_adapter_bytes": limits.max_adapter_bytes,
                                           "checked_against_pods": limits.checked},
                 "adapters": [i.to_dict() for i in inspections]},
          [*validation_lines(inspections), f"{len(inspections)} adapter(s): {len(inspections) - len(bad)} valid, "
           f"{len(bad)} with problems; {_limits_note(limits)}"])
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------
# diff and plans
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PlanItem:
    adapter: str
    status: str  # new | changed | unchanged | only_in_store
    local_version: str | None
    store_version: str | None


def compare(local: dict[str, manifest.Manifest], remote: dict[str, RemoteAdapter]) -> list[PlanItem]:
    items = []
    for name, m in sorted(local.items()):
        r = remote.get(name)
        if r is None or not r.files:
            items.append(PlanItem(name, "new", m.version, None))
        elif r.version == m.version:
            items.append(PlanItem(name, "unchanged", m.version, r.version))
        else:
            items.append(PlanItem(name, "changed", m.version, r.version))
    for name in sorted(set(remote) - set(local)):
        items.append(PlanItem(name, "only_in_store", None, remote[name].version))
    return items


def local_manifests(inspections: list[Inspection]) -> dict[str, manifest.Manifest]:
    return {i.name: manifest.build(i.name, i.folder, rank=i.config.top_rank if i.config else None,
                                   base_model=i.config.base_model if i.config else None)
            for i in inspections if i.ok}


_STATUS = {"new": "new", "changed": "changed", "unchanged": "unchanged", "only_in_store": "only in store"}


def plan_lines(url: S3Url, items: list[PlanItem]) -> list[str]:
    lines = [f"{len(items)} adapter(s) against {url}:"]
    for it in items:
        versions = {"new": f"{it.local_version} (not in the store)",
                    "changed": f"{it.store_version or 'no manifest'} -> {it.local_version}",
                    "unchanged": f"{it.local_version}",
                    "only_in_store": f"{it.store_version or 'no manifest'} (push --delete would delete it)"}[it.status]
        lines.append(f"  {_STATUS[it.status]:<14} {it.adapter:<20} {versions}")
    counts = {s: sum(1 for it in items if it.status == s) for s in _STATUS}
    lines.append(", ".join(f"{n} {_STATUS[s]}" for s, n in counts.items()))
    return lines


def plan_document(url: S3Url, items: list[PlanItem]) -> dict[str, Any]:
    return {"format": PLAN_FORMAT, "destination": str(url),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "adapters": [{"adapter": it.adapter, "status": it.status, "local_version": it.local_version,
                          "store_version": it.store_version} for it in items],
            "delete": [it.adapter for it in items if it.status == "only_in_store"]}


def _validated(args: argparse.Namespace, limits: Limits) -> list[Inspection]:
    inspections = inspect_all(args.dirs, limits)
    bad = [i for i in inspections if not i.ok]
    if bad:
        lines = validation_lines(bad)
        raise Refused("\n".join([f"{len(bad)} adapter(s) have problems; nothing was changed in the store:", *lines]))
    return inspections


def cmd_diff(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    limits = limits_from(args, settings)
    bucket = bucket_from(args, settings, args.destination)
    local = local_manifests(_validated(args, limits))
    items = compare(local, bucket.adapters())
    document = plan_document(bucket.url, items)
    lines = plan_lines(bucket.url, items)
    if args.plan:
        Path(args.plan).write_text(json.dumps(document, indent=2) + "\n")
        lines.append(f"plan written to {args.plan} (push --delete --plan {args.plan} deletes exactly "
                     f"{len(document['delete'])} adapter(s), if the store has not changed since)")
    _emit(args, document, lines)
    return 0


# --------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------
def allowlisted(args: argparse.Namespace) -> tuple[set[str], list[str]] | None:
    """The adapter names (as vLLM and the store know them) that some allowlist names, and where
    they were read; None when no gateway or gateway config was given."""
    names: set[str] = set()
    sources: list[str] = []
    if args.gateway:
        with GatewayClient(args.gateway, args.key) as gw:
            for base in gw.get("/admin/allowlist")["data"]:
                names.update(a["served_name"] for a in base["adapters"])
        sources.append(f"the gateway at {args.gateway}")
    if args.gateway_config:
        from gateway.config import ConfigError, load_config

        try:
            cfg = load_config(args.gateway_config)
        except ConfigError as exc:
            raise UsageError(f"--gateway-config {args.gateway_config}: {exc}") from None
        names.update(a.vllm_name for b in cfg.bases for a in b.adapters)
        sources.append(args.gateway_config)
    return (names, sources) if sources else None


def _check_plan(args: argparse.Namespace, url: S3Url, items: list[PlanItem]) -> list[str]:
    """The adapters to delete: those only in the store, confirmed by a plan or ``--yes``."""
    to_delete = [it for it in items if it.status == "only_in_store"]
    if args.plan:
        try:
            plan = json.loads(Path(args.plan).read_text())
            planned = {a["adapter"]: a["store_version"] for a in plan["adapters"] if a["status"] == "only_in_store"}
            destination = plan["destination"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"--plan {args.plan} is not a plan written by `loraroute adapters diff --plan`") from None
        if destination != str(url):
            raise Refused(f"the plan {args.plan} is for {destination}, not {url}; run diff against {url}")
        now = {it.adapter: it.store_version for it in to_delete}
        if now != planned:
            added = sorted(set(now) - set(planned))
            changed = sorted(n for n in set(now) & set(planned) if now[n] != planned[n])
            gone = sorted(set(planned) - set(now))
            raise Refused("the store changed since the plan was made (" + "; ".join(
                part for part in (f"new only in the store: {', '.join(added)}" if added else "",
                                  f"changed: {', '.join(changed)}" if changed else "",
                                  f"already gone: {', '.join(gone)}" if gone else "") if part)
                + f"); nothing was deleted: run `loraroute adapters diff ... --plan {args.plan}` again and read it")
    elif not args.yes:
        if to_delete and sys.stdin.isatty():
            shown = ", ".join(it.adapter for it in to_delete)
            answer = input(f"delete {len(to_delete)} adapter(s) from {url}: {shown}? type 'delete' to confirm: ")
            if answer.strip() != "delete":
                raise Refused("not confirmed; nothing was deleted")
        elif to_delete:
            raise Refused(f"--delete would delete {len(to_delete)} adapter(s) from {url} "
                          f"({', '.join(it.adapter for it in to_delete)}); run `loraroute adapters diff DIR {url} "
                          "--plan plan.json`, read it, then push with --delete --plan plan.json (or --yes)")
    return [it.adapter for it in to_delete]


def cmd_push(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    limits = limits_from(args, settings)
    bucket = bucket_from(args, settings, args.destination)
    layout_problem = check_layout(bucket.url, settings, bool(args.sidecar_config))
    if layout_problem and not args.force:
        raise Refused(layout_problem)
    inspections = _validated(args, limits)
    local = local_manifests(inspections)
    folders = {i.name: i.folder for i in inspections}
    if bucket.holds_adapter_itself():
        raise Refused(f"{bucket.url} holds adapter files itself: it is an adapter folder, not the folder of "
                      f"adapter folders; push to its parent")
    remote = bucket.adapters()
    items = compare(local, remote)
    to_delete: list[str] = []
    if args.delete:
        to_delete = _check_plan(args, bucket.url, items)
        if to_delete:
            listed = allowlisted(args)
            if listed is None and not args.force:
                raise Refused("--delete needs to know which adapters are still allowlisted: pass --gateway "
                              "(with the admin key) or --gateway-config FILE (or --force)")
            still = sorted(set(to_delete) & (listed[0] if listed else set()))
            if still and not args.force:
                raise Refused(f"refusing to delete {', '.join(still)}: still in an allowlist ({', '.join(listed[1])}"
                              "); retire them first (loraroute changes propose retire ...) or pass --force")
    progress = Progress(quiet=args.json)
    results = []
    for it in items:
        if it.status in ("new", "changed"):
            m = local[it.adapter]
            uploaded = bucket.upload_version(it.adapter, folders[it.adapter], m, progress.file)
            bucket.publish(it.adapter, m, live_had_manifest=remote.get(it.adapter) is not None
                           and remote[it.adapter].manifest is not None)
            results.append({"adapter": it.adapter, "status": it.status, "version": m.version,
                            "previous_version": it.store_version, "uploaded_bytes": uploaded})
        elif it.status == "unchanged":
            results.append({"adapter": it.adapter, "status": "unchanged", "version": it.local_version,
                            "previous_version": it.store_version, "uploaded_bytes": 0})
    deleted = []
    if to_delete:
        if not args.json:
            print(f"deleting from {bucket.url} (their versions under .versions/ stay): {', '.join(to_delete)}",
                  flush=True)
        for name in to_delete:
            bucket.delete(name)
            deleted.append(name)
    lines = [f"pushed to {bucket.url}:"]
    for r in results:
        change = {"new": f"published {r['version']}",
                  "changed": f"published {r['version']} (was {r['previous_version'] or 'without manifest'})",
                  "unchanged": f"unchanged ({r['version']})"}[r["status"]]
        lines.append(f"  {r['status']:<10} {r['adapter']:<20} {change}")
    if deleted:
        lines.append(f"  deleted    {', '.join(deleted)}")
    published = [r for r in results if r["status"] != "unchanged"]
    lines.append(f"{len(published)} published, {len(results) - len(published)} unchanged, {len(deleted)} deleted")
    for r in results:
        if r["status"] == "changed":
            lines.append(f"allowlisted pods keep {r['adapter']} at its pinned version until a roll is approved: "
                         f"loraroute changes propose roll --base <base> --adapter {r['adapter']} --version {r['version']}")
    _emit(args, {"destination": str(bucket.url), "adapters": results, "deleted": deleted}, lines)
    return 0


# --------------------------------------------------------------------------------------------
# ls
# --------------------------------------------------------------------------------------------
def residency(args: argparse.Namespace) -> dict[str, list[str]]:
    """adapter -> ["pod-0:gpu", ...] from the gateway's view of every pod."""
    out: dict[str, list[str]] = {}
    with GatewayClient(args.gateway, args.key) as gw:
        for pod in gw.get("/admin/pods")["data"]:
            state = pod.get("state") or {}
            for tier, key in (("gpu", "gpu_adapters"), ("cpu", "cpu_adapters"), ("loading", "loading_adapters"),
                              ("disk", "disk_adapters")):
                for name in state.get(key) or []:
                    tiers = out.setdefault(name, [])
                    if not any(t.startswith(pod["pod_id"] + ":") for t in tiers):
                        tiers.append(f"{pod['pod_id']}:{tier}")
    return out


def cmd_ls(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    bucket = bucket_from(args, settings, args.destination)
    remote = bucket.adapters()
    where: dict[str, list[str]] | None = None
    note = ""
    if args.gateway and not args.key:
        note = (f"residency not shown: no admin key for the gateway at {args.gateway} (set LORAROUTE_ADMIN_KEY "
                "or --key; any role may read)")
    elif args.gateway:
        try:
            where = residency(args)
        except GatewayError as exc:
            note = f"residency not shown: the gateway at {args.gateway} refused the pod list: {exc}"
    rows = []
    for name, r in sorted(remote.items()):
        m = r.manifest
        rows.append({"adapter": name, "version": r.version, "rank": r.rank, "size_bytes": r.size_bytes,
                     "sha256": {n: f.sha256 for n, f in m.files.items()} if m else None,
                     "pushed_at": m.pushed_at if m else None, "versions": list(r.versions), "problem": r.problem,
                     **({"resident": where.get(name, [])} if where is not None else {})})
    lines = [f"{len(rows)} adapter(s) in {bucket.url}"]
    header = f"  {'ADAPTER':<20} {'VERSION':<13} {'RANK':>4} {'SIZE':>9}  {'SHA256 (weights)':<14} {'VERSIONS':>8}"
    lines.append(header + ("  RESIDENT" if where is not None else ""))
    for row in rows:
        sha = (row["sha256"] or {}).get("adapter_model.safetensors", "")[:12] or "-"
        line = (f"  {row['adapter']:<20} {row['version'] or '-':<13} {row['rank'] or '?':>4} "
                f"{_size(row['size_bytes']):>9}  {sha:<14} {len(row['versions']):>8}")
        if where is not None:
            line += "  " + (" ".join(row["resident"]) or "-")
        lines.append(line)
        if row["problem"]:
            lines.append(f"      problem: {row['problem']}")
    if note:
        lines.append(note)
        if args.json:
            print(note, file=sys.stderr)
    _emit(args, {"destination": str(bucket.url), "adapters": rows}, lines)
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, *, s3: bool) -> None:
    p.add_argument("--sidecar-config", help="the sidecar's settings file: S3 endpoint, CA bundle, credentials, "
                                             "layout, max_lora_rank, base_model, max_adapter_bytes")
    p.add_argument("--max-lora-rank", type=int, help="the pods' --max-lora-rank (overrides the settings file)")
    p.add_argument("--base-model", help="the pods' --model, which base_model_name_or_path must equal")
    p.add_argument("--max-adapter-bytes", type=int, help="the sidecars' max_adapter_bytes")
    if s3:
        p.add_argument("--endpoint-url", help="S3 / MinIO endpoint, e.g. https://minio.internal:9000")
        p.add_argument("--region", help="S3 region")
        p.add_argument("--ca-bundle", help="PEM file of the CA that signed the endpoint's certificate")
        p.add_argument("--no-verify-tls", action="store_true", help="do not verify TLS certificates (testing only)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraroute adapters", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check adapter folders as a sidecar would")
    v.add_argument("dirs", nargs="+", metavar="DIR", help="an adapter folder or a folder of adapter folders")
    _common(v, s3=False)
    d = sub.add_parser("diff", help="what a push would change, by checksum")
    d.add_argument("dirs", nargs=1, metavar="DIR")
    d.add_argument("destination", metavar="s3://BUCKET/PREFIX/")
    d.add_argument("--plan", help="write the plan to this file (push --delete --plan FILE)")
    _common(d, s3=True)
    ps = sub.add_parser("push", help="validate, upload and publish adapters")
    ps.add_argument("dirs", nargs="+", metavar="DIR")
    ps.add_argument("destination", metavar="s3://BUCKET/PREFIX/")
    ps.add_argument("--delete", action="store_true", help="also delete adapters that are only in the store")
    ps.add_argument("--plan", help="with --delete: the plan of a diff run; the store must still match it")
    ps.add_argument("--yes", action="store_true", help="with --delete: confirm without a plan")
    ps.add_argument("--force", action="store_true",
                    help="delete allowlisted adapters too; push to a prefix the sidecars do not read")
    ps.add_argument("--gateway-config", help="a gateway config file whose allowlist protects adapters from --delete")
    add_gateway_arguments(ps)
    _common(ps, s3=True)
    ls = sub.add_parser("ls", help="list the adapters in a bucket (and where they are resident)")
    ls.add_argument("destination", metavar="s3://BUCKET/PREFIX/")
    add_gateway_arguments(ls)
    _common(ls, s3=True)
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": cmd_validate, "diff": cmd_diff, "push": cmd_push, "ls": cmd_ls,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"loraroute adapters: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"loraroute adapters {args.command}: {exc}", file=sys.stderr)
        return 1
    except SidecarError as exc:
        print(f"loraroute adapters {args.command}: [{exc.code}] {exc.message}", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"loraroute adapters {args.command}: gateway: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
