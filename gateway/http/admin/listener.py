"""``x402-gateway serve`` with ``[admin]``: the admin listener beside the public one, in one process and event loop.

One loop, because the admin API acts through the running gateway's own parts: a refund is sent by the network's
relayer (one nonce sequence per key and process), and a price change reaches the engine that prices requests.

Order: the admin port is bound first (a port already taken fails the start before anything else ran); the public
server starts; once its app started (stores, networks), the admin app starts. On SIGINT / SIGTERM the admin listener
stops first (its signal handlers are the last installed; uvicorn hands the signal on to the public server's), then the
public one drains its requests as before. Either one stopping stops the other.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any

import uvicorn

__all__ = ["serve_both", "serve_with_admin"]


def serve_with_admin(public: uvicorn.Config, admin: uvicorn.Config) -> None:
    """Run both servers until a signal stops them (``uvicorn.run`` for two listeners)."""
    admin_socket = admin.bind_socket()  # exits (code 1) if the port is taken, before anything started
    with asyncio.Runner(loop_factory=public.get_loop_factory()) as runner:
        runner.run(serve_both(uvicorn.Server(public), uvicorn.Server(admin), admin_sockets=[admin_socket]))


async def serve_both(
    public: uvicorn.Server,
    admin: uvicorn.Server,
    *,
    public_sockets: list[socket.socket] | None = None,
    admin_sockets: list[socket.socket] | None = None,
) -> None:
    main = asyncio.create_task(public.serve(sockets=public_sockets), name="x402-public-server")
    while not public.started:
        if main.done():
            await main  # the public app failed to start: its exit, as uvicorn.run would
            return
        await asyncio.sleep(0.01)
    side = asyncio.create_task(_exit_code(admin.serve(sockets=admin_sockets)), name="x402-admin-server")
    await asyncio.wait({main, side}, return_when=asyncio.FIRST_COMPLETED)
    admin.should_exit = public.should_exit = True
    code = await side
    await main
    if code:
        raise SystemExit(code)  # the admin app failed to start: the public server was stopped first


async def _exit_code(serving: Coroutine[Any, Any, None]) -> int:
    """uvicorn exits the process (``SystemExit``) when an app fails to start; here it stops the other server first."""
    try:
        await serving
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0
