"""``loraroute gateway --config FILE``: run the routing gateway.

Serves with uvicorn on uvloop + httptools (the fastest stack measured, docs/gateway.md) through
``gateway.http_limits`` (bounded request heads), no access log (the metrics count requests);
SIGTERM drains (``gateway.drain``). ``--host`` / ``--port`` override ``server.host`` /
``server.port``. Exit status 2 on an invalid config, with every problem and its key path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from gateway.config import ConfigError, GatewayConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraroute gateway", description="Adapter-aware routing gateway for vLLM pods.")
    p.add_argument("--config", "-c", help="YAML config file (docs/config.md); without it, all defaults")
    p.add_argument("--host", help="override server.host")
    p.add_argument("--port", type=int, help="override server.port")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    return p


def uvicorn_config(app: object, config: GatewayConfig, host: str, port: int,
                   head_limits: Callable[[], tuple[int, int]] | None = None) -> object:
    """uvicorn's settings; ``head_limits()`` -> (max head bytes, max headers) of each request
    (default: ``config``'s, fixed)."""
    import uvicorn

    from gateway.http_limits import bounded_protocol

    if head_limits is None:
        limits = (config.server.max_header_bytes, config.server.max_headers)
        head_limits = lambda: limits  # noqa: E731
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=bounded_protocol(head_limits),
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=75,
        server_header=False,
        date_header=False,
        # nothing reads the client's address or scheme; parsing X-Forwarded-* would cost every request
        proxy_headers=False,
    )


async def serve(config: GatewayConfig, config_path: str | None, host: str, port: int) -> None:
    from gateway.app import create_app
    from gateway.drain import DrainingServer
    from gateway.service import Gateway

    gw = Gateway(config, config_path)
    app = create_app(gw)

    def head_limits() -> tuple[int, int]:
        server = gw.runtime.config.server
        return server.max_header_bytes, server.max_headers

    server = DrainingServer(uvicorn_config(app, config, host, port, head_limits), gw)  # type: ignore[arg-type]
    await server.serve()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"loraroute gateway: invalid config: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    try:
        from gateway.service import build_pipeline

        build_pipeline(config.pipeline)
    except ConfigError as e:
        print(f"loraroute gateway: invalid config: {e}", file=sys.stderr)
        return 2
    if args.check:
        print("config ok")
        return 0
    print(f"loraroute gateway listening on http://{host}:{port}", flush=True)
    try:
        import uvloop

        uvloop.run(serve(config, args.config, host, port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
