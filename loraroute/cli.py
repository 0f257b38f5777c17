"""`loraroute <command> ...`: each command's parser and main live in the part that owns it."""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, one-line help). Each module exposes ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("loraroute.demo", "gateway + simulated vLLM pods + in-memory state, on loopback"),
    "gateway": ("gateway.cli", "run the routing gateway from a YAML config"),
    "sidecar": ("vllm_sidecar.cli", "run the sidecar beside one vLLM pod"),
    "sim": ("vllm_sim.cli", "run simulated vLLM pods (one, or a cluster)"),
    "bench": ("bench.cli", "workloads, benchmark runs and reports"),
    "adapters": ("loraroute.adapters_cli", "validate, diff, push and list adapters in S3 / MinIO"),
    "changes": ("loraroute.changes_cli", "propose, approve, roll back run-time changes; the audit log"),
    "doctor": ("loraroute.doctor", "the pre-production checklist, offline (chart values) or live"),
}


def _usage() -> str:
    lines = ["usage: loraroute <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`loraroute <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"loraroute: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except BrokenPipeError:  # `loraroute ... | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
