"""``loraroute doctor``: the pre-production checklist as a command, re-runnable after every change.

    loraroute doctor -f my-values.yaml [-f more.yaml] [--chart helm/loraroute]   # offline: chart values
    loraroute doctor --gateway URL [--key KEY] [--api-key TENANT_KEY]            # live: the installation
    loraroute doctor request --model base:adapter --gateway URL [--key KEY]      # one call, layer by layer

Offline and live checks can run together (``-f`` and ``--gateway``; with ``-f``, only an explicit
``--gateway`` adds the live checks, not ``LORAROUTE_GATEWAY``). Each line is PASS, WARN,
FAIL or SKIP with the fix; the exit status is 1 when any line FAILs, 2 on bad usage, else 0.
``--json`` prints ``{"checks": [...], "summary": {...}}``. What is checked:
loraroute/doctor_values.py (offline), loraroute/doctor_live.py (live and ``request``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from loraroute import doctor_report
from loraroute.doctor_live import check_live, trace_request
from loraroute.doctor_report import Check
from loraroute.doctor_values import DEFAULT_CHART, check_values, load_values
from loraroute.gateway_client import ENV_URL, GatewayClient, GatewayError
from loraroute.gateway_client import add_arguments as add_gateway_arguments


def _output(args: argparse.Namespace, title: str, checks: list[Check]) -> int:
    if args.json:
        print(json.dumps({"checks": [c.to_dict() for c in checks], "summary": doctor_report.summary(checks)},
                         indent=2))
    else:
        print("\n".join(doctor_report.lines(title, checks)))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def checklist(args: argparse.Namespace) -> int:
    if args.gateway is None and not args.values:
        args.gateway = os.environ.get(ENV_URL)
    if not args.values and not args.gateway:
        print("loraroute doctor: give -f VALUES (offline) and/or --gateway URL (live); see --help", file=sys.stderr)
        return 2
    checks: list[Check] = []
    titles = []
    if args.values:
        try:
            values = load_values(Path(args.chart), args.values)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"loraroute doctor: {exc}", file=sys.stderr)
            return 2
        checks += check_values(values)
        chart = "the loraroute chart" if Path(args.chart) == DEFAULT_CHART else f"chart {args.chart}"
        titles.append(f"{chart} with {', '.join(args.values)}")
    if args.gateway:
        with GatewayClient(args.gateway, args.key, timeout_s=args.timeout) as gw:
            try:
                checks += check_live(gw, args.api_key)
            except GatewayError as exc:
                checks.append(Check("Gateway", "admin API", "FAIL", str(exc)))
        titles.append(f"gateway {args.gateway}")
    return _output(args, "loraroute doctor: " + "; ".join(titles), checks)


def request(args: argparse.Namespace) -> int:
    args.gateway = args.gateway or os.environ.get(ENV_URL)
    if not args.gateway:
        print("loraroute doctor request: --gateway (or LORAROUTE_GATEWAY) is required", file=sys.stderr)
        return 2
    with GatewayClient(args.gateway, args.key, timeout_s=args.timeout) as gw:
        admin = False
        if args.key:
            try:
                gw.get("/admin/whoami")
                admin = True
            except GatewayError:
                admin = False
        try:
            checks = trace_request(gw, args.model, args.api_key or args.key, admin)
        except GatewayError as exc:
            checks = [Check("Request", "HTTP", "FAIL", str(exc))]
    return _output(args, f"loraroute doctor request: {args.model} through {args.gateway}", checks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraroute doctor", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("-f", "--values", action="append", default=[], metavar="VALUES",
                   help="a chart values file (repeatable, merged in order over the chart's defaults)")
    p.add_argument("--chart", default=str(DEFAULT_CHART), help="the loraroute chart's folder (default: the one beside "
                                                              "this package, helm/loraroute)")
    add_gateway_arguments(p)
    p.set_defaults(gateway=None)  # resolved in checklist(): the environment counts only without -f
    p.add_argument("--api-key", help="a tenant's API key for the test requests (when the gateway has tenants)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP call (default 60)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def build_request_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraroute doctor request",
                                description="one minimal call traced layer by layer: HTTP, auth, allowlist, store "
                                            "fetch, TLS, validation, GPU load, inference")
    p.add_argument("--model", required=True, help="base:adapter (or a bare base)")
    add_gateway_arguments(p)
    p.set_defaults(gateway=None)
    p.add_argument("--api-key", help="a tenant's API key (default: the admin key)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP call (default 120)")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["request"]:
        return request(build_request_parser().parse_args(argv[1:]))
    return checklist(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
