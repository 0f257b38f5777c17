"""``loraroute changes``: propose, approve, reject and roll back run-time changes; read the audit log.

A thin client of the gateway's admin API (gateway/changes_api.py); the gateway enforces roles
and the two-person rule, this only formats. ``--gateway`` / ``LORAROUTE_GATEWAY`` and ``--key`` /
``LORAROUTE_ADMIN_KEY`` say where and who.

    loraroute changes propose add --base tsuzumi-base --adapter sql [--rank 8] [--version V]
    loraroute changes propose retire --base tsuzumi-base --adapter sql
    loraroute changes propose roll --base tsuzumi-base --adapter sql --version 9f8e7d6c5b4a
    loraroute changes propose weights prefix-cache=2 estimated-ttft=3
    loraroute changes list [--status pending]      loraroute changes show chg-4
    loraroute changes approve chg-4 [--note ...]    loraroute changes reject chg-4 [--note ...]
    loraroute changes rollback chg-4                loraroute changes audit [--limit 20] [--jsonl]

Exit status: 0 done, 1 the gateway refused (the reason is printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from loraroute.gateway_client import GatewayClient, GatewayError, error_of
from loraroute.gateway_client import add_arguments as add_gateway_arguments


def _value(v: Any) -> str:
    if isinstance(v, dict) and set(v) == {"version"}:
        return str(v["version"] or "unpinned (the store's live folder)")
    if isinstance(v, dict) and set(v) == {"adapter"}:
        a = v["adapter"]
        return "absent" if a is None else f"{a['name']} (rank {a.get('rank') or '?'}, version {a.get('version') or '-'})"
    if isinstance(v, dict) and set(v) == {"weights"}:
        return ", ".join(f"{k}={w:g}" for k, w in sorted(v["weights"].items()))
    return json.dumps(v)


def change_lines(c: dict[str, Any]) -> list[str]:
    lines = [f"{c['id']}  {c['status']:<11} {c['what']}",
             f"    proposed by {c['proposed_by']} at {c.get('proposed_time', '?')}"
             + (f"; {c['spec']['reason']}" if c["spec"].get("reason") else "")]
    if c.get("needs_approval") and c["status"] == "pending":
        lines.append("    waiting for a second key with the approver role: loraroute changes approve " + c["id"])
    if c.get("decided_by"):
        lines.append(f"    {'approved' if c['status'] != 'rejected' else 'rejected'} by {c['decided_by']} at "
                     f"{c.get('decided_time', '?')}" + (f": {c['decision_note']}" if c.get("decision_note") else ""))
    lines.append(f"    before: {_value(c.get('before'))}")
    lines.append(f"    after:  {_value(c.get('after'))}")
    for name, digest in sorted((c.get("checksums") or {}).items()):
        lines.append(f"    sha256 {name}: {digest}")
    for e in c.get("effects") or []:
        detail = {"replaced": f"{e.get('previous_version')} -> {e.get('version')}"
                              + (", swapped into vLLM in place" if e.get("reloaded") else ", on disk (vLLM had not loaded it)"),
                  "current": f"already at {e.get('version')}",
                  "absent": "does not hold it; fetches the pinned version when a request needs it",
                  "no_sidecar": "no sidecar, nothing to swap",
                  "failed": e.get("error") or "failed"}[e["status"]]
        lines.append(f"    {e['pod']}: {e['status']}: {detail}")
    if c.get("note"):
        lines.append(f"    note: {c['note']}")
    if c.get("error"):
        lines.append(f"    error: {c['error']}")
    if c.get("rolled_back_by"):
        lines.append(f"    rolled back by {c['rolled_back_by']}")
    if c["status"] == "applied" and not c.get("rollback_of"):
        lines.append(f"    undo: loraroute changes rollback {c['id']}")
    return lines


def audit_lines(entries: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in entries:
        out.append(f"{e['seq']:>5} {e['time']} {e['event']:<11} {e['change_id']:<8} by {e['by']:<10} {e['what']}")
    return out


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    if args.what == "weights":
        weights: dict[str, float] = {}
        for item in args.weights:
            name, sep, value = item.partition("=")
            try:
                weights[name] = float(value)
            except ValueError:
                sep = ""
            if not sep or not name:
                raise ValueError(f"{item!r}: write SCORER=WEIGHT, e.g. prefix-cache=2")
        return {"kind": "pipeline.weights", "weights": weights, "reason": args.reason}
    body: dict[str, Any] = {"base": args.base, "adapter": args.adapter, "reason": args.reason}
    if args.what == "add":
        body.update(kind="allowlist.add", rank=args.rank, served_name=args.served_name, version=args.version)
        return {k: v for k, v in body.items() if v is not None}
    if args.what == "retire":
        return {**body, "kind": "allowlist.retire"}
    if not args.unpin and not args.version:
        raise ValueError("roll needs --version VERSION (as `loraroute adapters push` printed it) or --unpin")
    return {**body, "kind": "adapter.roll", "version": None if args.unpin else args.version}


def run(args: argparse.Namespace, gw: GatewayClient) -> tuple[Any, list[str]]:
    if args.command == "propose":
        c = gw.post("/admin/changes", _spec(args))
        return c, change_lines(c)
    if args.command == "list":
        params = {"status": args.status} if args.status else {}
        data = gw.get("/admin/changes", **params)["data"]
        lines = [line for c in data for line in change_lines(c)[:1]] or ["no changes"]
        return data, lines
    if args.command == "show":
        c = gw.get(f"/admin/changes/{args.id}")
        return c, change_lines(c)
    if args.command in ("approve", "reject"):
        c = gw.post(f"/admin/changes/{args.id}/{args.command}", {"note": args.note} if args.note else None)
        return c, change_lines(c)
    if args.command == "rollback":
        c = gw.post(f"/admin/changes/{args.id}/rollback")
        return c, change_lines(c)
    data = gw.get("/admin/audit", limit=args.limit)["data"]
    return data, audit_lines(data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraroute changes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gateway_arguments(p, required=True)
    p.add_argument("--json", action="store_true", help="print the gateway's JSON answer")
    sub = p.add_subparsers(dest="command", required=True)
    propose = sub.add_parser("propose", help="propose a change (operator role)")
    kinds = propose.add_subparsers(dest="what", required=True)
    for name, help_ in (("add", "add an adapter to a base's allowlist"), ("retire", "retire an adapter"),
                        ("roll", "roll an adapter to another version")):
        k = kinds.add_parser(name, help=help_)
        k.add_argument("--base", required=True, help="the base name clients use")
        k.add_argument("--adapter", required=True, help="the adapter name clients use")
        k.add_argument("--reason", default="", help="why (kept in the audit log)")
        if name == "add":
            k.add_argument("--rank", type=int, help="LoRA rank (default: read from the store)")
            k.add_argument("--served-name", help="the name vLLM and the store know (default: --adapter)")
            k.add_argument("--version", help="version to pin (default: the store's current one)")
        if name == "roll":
            k.add_argument("--version", help="the version to roll to")
            k.add_argument("--unpin", action="store_true", help="follow the store's live folder instead of a version")
    w = kinds.add_parser("weights", help="re-weight the pipeline's scorers")
    w.add_argument("weights", nargs="+", metavar="SCORER=WEIGHT")
    w.add_argument("--reason", default="")
    ls = sub.add_parser("list", help="changes, newest first")
    ls.add_argument("--status", choices=["pending", "applied", "failed", "rejected", "expired", "rolled_back"])
    for name, help_ in (("show", "one change"), ("approve", "approve (approver role, not the proposer)"),
                        ("reject", "reject (approver role)"), ("rollback", "undo an applied change (operator role)")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("id")
        if name in ("approve", "reject"):
            c.add_argument("--note", default="", help="kept in the audit log")
    a = sub.add_parser("audit", help="the newest audit log entries")
    a.add_argument("--limit", type=int, default=20)
    a.add_argument("--jsonl", action="store_true", help="the JSON lines as stored")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.gateway:
        print("loraroute changes: --gateway (or LORAROUTE_GATEWAY) is required", file=sys.stderr)
        return 2
    try:
        with GatewayClient(args.gateway, args.key) as gw:
            if args.command == "audit" and args.jsonl:
                resp = gw.request("GET", "/admin/audit", params={"limit": args.limit, "format": "jsonl"})
                if resp.status_code >= 400:
                    raise error_of(resp)
                sys.stdout.write(resp.text)
                return 0
            document, lines = run(args, gw)
    except ValueError as exc:
        print(f"loraroute changes: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"loraroute changes {args.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(document, indent=2) if args.json else "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
