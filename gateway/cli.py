"""``x402-gateway``: serve, check a config, run the demo; and the client commands (prompt, status, cancel, jobs:
their options in :mod:`gateway.client._arguments`, their code in :mod:`gateway.client._commands`); and the
operator's ``admin`` commands (:mod:`gateway.http.admin.commands`, a client of the admin API).

Exit codes: 0 success, 1 failure at run time (for the client: the job failed, was cancelled or timed out), 2 usage
or configuration error, 3 payment refused (client commands).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gateway.client._arguments import CLIENT_COMMANDS, add_client_commands, redact_keys
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.http.admin.commands import ADMIN_COMMANDS, add_admin_commands
from gateway.money import format_usd


def _config_error(exc: ConfigError) -> NoReturn:
    """Exit 2 with the message only: never a traceback, whose chained causes may quote what the message leaves
    out (a store URL's password)."""
    print(f"x402-gateway: config error: {exc.message}", file=sys.stderr)
    raise SystemExit(2) from None


def _load(path: str) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        _config_error(exc)


def check_store_urls(config: GatewayConfig) -> None:
    """Every store URL of ``config`` read by the parsers ``serve`` uses (``ConfigError`` naming the key), so that
    ``check`` never says "ok" for a URL ``serve`` refuses. Nothing is connected."""
    from gateway.ops.ratelimit import open_storage
    from gateway.storage.backend import open_backend

    open_backend(config.store.url.reveal(), config_key="store.url")
    for key, url in (
        ("idempotency.store_url", config.idempotency.store_url),
        ("ledger.store_url", config.ledger.store_url),
    ):
        if url is not None:
            open_backend(url.reveal(), config_key=key)
    open_storage(config.rate_limits.storage_url.reveal())  # ConfigError("rate_limits.storage_url", ...)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.http.app import build_app
    from gateway.http.server import HEAD_SLACK_BYTES, guarded_protocol
    from gateway.ops.logs import configure_logging

    config = _load(args.config)
    configure_logging(args.log_level, json=args.log_format == "json")
    for warning in config_warnings(config):  # what ``check`` prints, for operators who never ran it
        logging.getLogger("gateway.config").warning("config: %s", warning)
    host = args.host or config.server.listen_host
    port = args.port or config.server.listen_port
    server = config.server
    # SIGHUP reloads routes and prices from args.config (docs/operating.md, "Prices and routes at run time")
    try:
        app = build_app(config, freeze_heap=True, config_path=args.config, reload_on_sighup=True)
    except ConfigError as exc:  # a store URL the loader let through but a store refuses
        _config_error(exc)
    options: dict[str, Any] = dict(
        # httptools with a cap on an unfinished request head (and trailers) and deadlines for it and for a body
        # left unread (uvicorn has none of them for httptools; docs/threat-model.md T40, gateway/http/server.py)
        http=guarded_protocol(
            max_head_bytes=server.max_header_bytes + HEAD_SLACK_BYTES,
            head_timeout=server.header_read_timeout,
            drain_timeout=server.body_read_timeout,
        ),
        log_level=args.log_level,
        log_config=None,  # uvicorn's records go through our handler (format, secret redaction)
        access_log=False,  # gateway.access writes one richer line per request
        lifespan="on",
        proxy_headers=False,  # forwarded headers are trusted only through server.trust_forwarded_headers
        server_header=False,
        date_header=False,  # the upstream's own Date passes through (gateway/http/server.py adds one where none is)
    )
    if config.admin is None:
        uvicorn.run(app, host=host, port=port, **options)
        return 0
    # [admin]: its own listener beside the public one, in this process (gateway/http/admin/listener.py)
    from gateway.http.admin.app import AdminApp
    from gateway.http.admin.listener import serve_with_admin

    admin = config.admin
    serve_with_admin(
        uvicorn.Config(app, host=host, port=port, **options),
        uvicorn.Config(AdminApp(app), host=admin.listen_host, port=admin.listen_port, **options),
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    try:
        check_store_urls(config)
    except ConfigError as exc:
        _config_error(exc)
    print(f"ok: {len(config.routes)} priced route(s), networks: {', '.join(config.networks)}")
    for route in config.routes:
        price = f"${format_usd(route.price)} ({route.price} atomic units)"
        print(f"  {route.route}  {price}  on {', '.join(route.networks)}  settle {route.settlement}")
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def config_warnings(config: GatewayConfig) -> list[str]:
    """Settings that are valid but probably not what the operator wants (``check`` prints them)."""
    warnings: list[str] = []
    up = config.upstream
    if up.headers and up.inject_headers_on == "all" and config.server.unpriced == "pass":
        names = ", ".join(name for name, _ in up.headers)
        warnings.append(
            f'upstream.inject_headers_on = "all" with server.unpriced = "pass": every free path reaches the '
            f"upstream with its credentials ({names}), so anyone can use the upstream's own API through the "
            'gateway for nothing; use "priced" (the default), a list of the free routes that need them, or '
            'server.unpriced = "refuse"'
        )
    if config.admin is not None and config.admin.listen_host not in ("127.0.0.1", "::1", "localhost"):
        warnings.append(
            f"admin.listen = {config.admin.listen_host}:{config.admin.listen_port} is reachable from other hosts: "
            "the admin API speaks plain HTTP with bearer tokens; keep it on a private network or behind TLS"
        )
    if config.jobs is not None:
        from gateway.config.jobs import jobs_warnings

        warnings.extend(jobs_warnings(config.jobs, config.routes))
    if any("batch-settlement" in route.schemes for route in config.routes):
        from gateway.config.sessions import sessions_warnings

        warnings.extend(sessions_warnings(config.sessions))
    return warnings


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.dev.demo import run_demo, run_jobs_demo

    return run_jobs_demo() if args.jobs else run_demo()


def cmd_store_acknowledge(args: argparse.Namespace) -> int:
    """docs/threat-model.md T30: payments stay refused after a store lost its records until this is run."""
    import asyncio

    from gateway.engine.identity import acknowledge
    from gateway.storage import open_store

    config = _load(args.config)

    async def run() -> tuple[str | None, str | None]:
        store = open_store(config.store.url.reveal())
        try:
            return await acknowledge(store)  # a healthy marker is left alone (after is None)
        finally:
            await store.aclose()

    try:
        before, after = asyncio.run(run())
    except ConfigError as exc:  # open_store: a store URL the loader let through but the store refuses
        _config_error(exc)
    if after is None:
        print(f"nothing to acknowledge: the store is not marked lost (identity {before}); it was left unchanged")
    elif before is not None:
        print(f"acknowledged: the store had lost its records (was {before}); new identity {after}")
    else:
        print(f"new identity {after} (the store had no identity marker)")
    return 0


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
    demo.add_argument(
        "--jobs", action="store_true", help="a paid job instead: submit, live progress, free polls by the payer only"
    )
    demo.set_defaults(func=cmd_demo)
    store = sub.add_parser("store", help="operator actions on the receipt store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    ack = store_sub.add_parser(
        "acknowledge", help="accept that the receipt store lost its records: the gateways take payments again"
    )
    ack.add_argument("-c", "--config", required=True)
    ack.set_defaults(func=cmd_store_acknowledge)
    add_client_commands(sub)
    add_admin_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    client_command = args.command in (*CLIENT_COMMANDS, *ADMIN_COMMANDS, "demo")
    # The client commands' and the demo's output is for people (progress, errors): no log lines in between.
    logging.basicConfig(
        level=logging.WARNING if client_command else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        result: int = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader gone by then would be a traceback
    except BrokenPipeError:
        # The reader stopped early (`... --json | head`): the rest of the output is not wanted, and a traceback
        # would hide the part that was. Later flushes of stdout go nowhere. 141 = 128 + SIGPIPE, what a shell
        # reports for a program the signal ended: none of the documented exit codes (README, "Client SDK and CLI").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return result


if __name__ == "__main__":
    raise SystemExit(main())
