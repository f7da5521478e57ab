"""``x402-gateway``: serve, check a config, run the demo; and the client commands (prompt, status, cancel, jobs:
see :mod:`gateway.client._commands`).

Exit codes: 0 success, 1 failure at run time (for the client: the job failed, was cancelled or timed out), 2 usage
or configuration error, 3 payment refused (client commands).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

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


# ------------------------------------------------------------------------------------------- client commands
# The parser lives here, the commands in gateway.client._commands (loaded only to run one: eth_account alone
# takes ~0.7 s to import, which a usage error should not cost).

KEY_ENV = "X402_WALLET_KEY"
URL_ENV = "X402_GATEWAY_URL"
RPC_ENV_PREFIX = "X402_RPC_URL_"
KEY_LIKE = re.compile(r"(0x)?[0-9a-fA-F]{64}")
CLIENT_COMMANDS = ("prompt", "status", "cancel", "jobs")


def redact_keys(text: str) -> str:
    """Hide anything shaped like a private key (argparse echoes unknown arguments in its errors)."""
    return KEY_LIKE.sub("<redacted>", text)


def cmd_client(args: argparse.Namespace) -> int:
    from gateway.client._commands import run_client_command

    return run_client_command(args)


def add_client_commands(sub: Any) -> None:
    """prompt / status / cancel / jobs. The wallet key is read from $X402_WALLET_KEY or --key-file only: no
    option takes the key itself (argv is visible to every process and lands in shell history)."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--url", help=f"the gateway's base URL (default: ${URL_ENV})")
    common.add_argument("--style", choices=["agent", "messaging"], default="agent", help="job API style")
    common.add_argument("--key-file", metavar="PATH", help=f"file holding the wallet key (default: ${KEY_ENV})")
    common.add_argument("--max-price", metavar="USD", help="refuse to pay more than this per request (default 1.00)")
    common.add_argument(
        "--network", action="append", metavar="NAME", help="only pay on this network (repeatable; e.g. base)"
    )
    common.add_argument(
        "--pay-with",
        choices=["exact", "txhash", "auto"],
        default="exact",
        help=f"x402 signature, USDC transfer (RPC URLs from ${RPC_ENV_PREFIX}<NETWORK>), or either",
    )
    common.add_argument("--confirmations", type=int, default=1, help="blocks a transfer waits for (txhash)")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    prompt = sub.add_parser("prompt", parents=[common], help="pay, submit a prompt, show its progress and answer")
    prompt.add_argument("text", help="the prompt")
    prompt.add_argument("--thread", metavar="ID", help="continue this thread (style agent)")
    prompt.add_argument("--user-id", metavar="ID", help="userId (style messaging; default: the wallet address)")
    prompt.add_argument("--no-wait", action="store_true", help="submit only: print the job id and exit")
    prompt.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    prompt.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this (default 300)")
    status = sub.add_parser("status", parents=[common], help="show a job (exit 1 if it failed or was cancelled)")
    status.add_argument("job_id", metavar="JOB_ID")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a pending or processing job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    jobs = sub.add_parser("jobs", parents=[common], help="list this wallet's jobs")
    jobs.add_argument("--status", help="only jobs with this status")
    jobs.add_argument("--limit", type=int, help="at most this many (default: the server's, 50)")
    for command in (prompt, status, cancel, jobs):
        command.set_defaults(func=cmd_client)


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
