"""``x402-gateway``: serve, check a config, run the demo; and the client commands (prompt, status, cancel, jobs:
their options in :mod:`gateway.client._arguments`, their code in :mod:`gateway.client._commands`).

Exit codes: 0 success, 1 failure at run time (for the client: the job failed, was cancelled or timed out), 2 usage
or configuration error, 3 payment refused (client commands).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gateway.client._arguments import CLIENT_COMMANDS, add_client_commands, redact_keys
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.money import format_usd


def _load(path: str) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"x402-gateway: config error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.http.app import build_app
    from gateway.ops.logs import configure_logging

    config = _load(args.config)
    configure_logging(args.log_level, json=args.log_format == "json")
    host = args.host or config.server.listen_host
    port = args.port or config.server.listen_port
    uvicorn.run(
        build_app(config, freeze_heap=True),
        host=host,
        port=port,
        log_level=args.log_level,
        log_config=None,  # uvicorn's records go through our handler (format, secret redaction)
        access_log=False,  # gateway.access writes one richer line per request
        lifespan="on",
        proxy_headers=False,  # forwarded headers are trusted only through server.trust_forwarded_headers
        server_header=False,
        date_header=False,  # the upstream's own Date header passes through; two would confuse clients
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"ok: {len(config.routes)} priced route(s), networks: {', '.join(config.networks)}")
    for route in config.routes:
        price = f"${format_usd(route.price)} ({route.price} atomic units)"
        print(f"  {route.route}  {price}  on {', '.join(route.networks)}  settle {route.settlement}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.dev.demo import run_demo

    return run_demo()


class _Parser(argparse.ArgumentParser):
    """No abbreviations (``--key`` must not quietly mean ``--key-file``), and usage errors never echo anything
    shaped like a private key (argparse repeats unknown arguments in its message)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {redact_keys(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="x402-gateway", description="x402 pay-per-request gateway and client")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway in front of the configured upstream")
    serve.add_argument("-c", "--config", required=True, help="TOML configuration file")
    serve.add_argument("--host", help="override server.listen's host")
    serve.add_argument("--port", type=int, help="override server.listen's port")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", default="json", choices=["json", "text"], help="log lines (default: json)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate a configuration file without serving")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check)
    demo = sub.add_parser("demo", help="one real payment end to end on a local chain")
    demo.set_defaults(func=cmd_demo)
    add_client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    client_command = args.command in CLIENT_COMMANDS
    # The client commands' stderr is for people (progress, errors): no log lines in between.
    logging.basicConfig(
        level=logging.WARNING if client_command else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
