"""Child process entry: ``python -m bench.serve KIND SPEC.json --fd N`` serves one app under uvicorn.

KIND is ``upstream`` (the raw-ASGI hello), ``floor`` (the least a Python proxy does, in front of it), ``official``
(FastAPI + the ``x402`` package's middleware) or ``facilitator`` (the ``x402`` package's facilitator over HTTP).
Every kind runs with uvloop + httptools, no access log of uvicorn's own, one worker. (The gateway is not started
here: it runs as ``x402-gateway serve``, see :class:`bench.procs.ServedGateway`.)
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn


def _app(kind: str, spec: dict[str, Any]) -> Any:
    if kind == "upstream":
        from bench.apps import hello_app

        return hello_app
    if kind == "official":
        from bench.apps import official_app

        return official_app(spec)
    if kind == "floor":
        from bench.apps import floor_app

        return floor_app(spec)
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
        lifespan="off" if args.kind in ("upstream", "floor") else "on",
        log_level="warning",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        backlog=2048,
        timeout_keep_alive=30,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
