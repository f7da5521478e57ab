"""Child process entry: ``python -m bench.serve KIND SPEC.json --fd N`` serves one app under uvicorn.

KIND is ``upstream`` (the raw-ASGI hello), ``gateway`` (``build_app`` of the config in the spec), ``official``
(FastAPI + the ``x402`` package's middleware) or ``facilitator`` (the ``x402`` package's facilitator over HTTP).
Every kind runs with uvloop + httptools, no access log of uvicorn's own, one worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn


def _gateway(spec: dict[str, Any]) -> Any:
    from gateway.config import parse_config
    from gateway.http.app import build_app
    from gateway.ops.logs import configure_logging

    # As ``x402-gateway serve`` does: one JSON line per request at "info" (the default), to a file here.
    level = spec.get("log_level", "info")
    log_file = open(spec["log_file"], "a", buffering=1 << 16)  # noqa: SIM115 - lives as long as the process
    configure_logging(level, json=True, stream=log_file)
    return build_app(parse_config(spec["config"], env=os.environ, base_dir=Path(spec["base_dir"])), freeze_heap=True)


def _app(kind: str, spec: dict[str, Any]) -> Any:
    if kind == "upstream":
        from bench.apps import hello_app

        return hello_app
    if kind == "gateway":
        return _gateway(spec)
    if kind == "official":
        from bench.apps import official_app

        return official_app(spec)
    if kind == "facilitator":
        from bench.apps import facilitator_app

        return facilitator_app(spec)
    raise SystemExit(f"unknown server kind {kind!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("kind")
    parser.add_argument("spec")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    spec: dict[str, Any] = json.loads(Path(args.spec).read_text())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app = _app(args.kind, spec)
    sock = socket.socket(fileno=args.fd)  # family/type detected from the inherited listening socket
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="off" if args.kind == "upstream" else "on",
        log_level="warning",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=args.kind != "gateway",  # as ``x402-gateway serve``: the upstream's Date passes through
        backlog=2048,
        timeout_keep_alive=30,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
