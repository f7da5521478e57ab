"""Admin API fixtures: a real gateway and its admin listener in one uvicorn event loop, as ``serve`` runs them.

``running_admin(chain, store_url, tmp_path)`` serves ``build_app(config)`` and ``AdminApp`` through
:func:`gateway.http.admin.listener.serve_both` (the code ``x402-gateway serve`` runs) on two free ports, with two
tokens (read, write) and a refund key in the environment. ``store_url`` runs a test once per store backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from gateway.http.admin.app import AdminApp
from gateway.http.admin.listener import serve_both
from gateway.http.app import Gateway, build_app
from tests.support.gateway import GatewayUnderTest, gateway_config, network_name
from tests.support.servers import RecordingUpstream, ThreadedServer, serve_asgi, stop_server_thread

READ_TOKEN = "read-token-" + "r" * 24
WRITE_TOKEN = "write-token-" + "w" * 24
TOKENS = [{"env": "TEST_ADMIN_READ", "access": "read"}, {"env": "TEST_ADMIN_WRITE", "access": "write"}]


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch) -> LocalAccount:
    """The admin tokens and a fresh refund wallet's key in the environment; returns the refund wallet."""
    refund: LocalAccount = Account.create()
    monkeypatch.setenv("TEST_ADMIN_READ", READ_TOKEN)
    monkeypatch.setenv("TEST_ADMIN_WRITE", WRITE_TOKEN)
    monkeypatch.setenv("TEST_REFUND_KEY", refund.key.hex())
    return refund


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Admin:
    url: str  # the admin listener
    gateway: GatewayUnderTest
    audit_log: Path
    refund: LocalAccount
    app: AdminApp = field(repr=False)

    def client(self, token: str | None = WRITE_TOKEN) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]


@contextlib.contextmanager
def running_admin(
    chain: DevChain,
    store_url: str,
    tmp_path: Path,
    refund: LocalAccount,
    *,
    routes: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> Iterator[Admin]:
    """The gateway (its public listener) and its admin listener, served together as ``serve`` does."""
    upstream = RecordingUpstream()
    audit_log = tmp_path / f"audit-{time.monotonic_ns()}.jsonl"
    admin_section = {
        "listen": "127.0.0.1:9402",  # not bound: the test binds free ports itself
        "tokens": TOKENS,
        "audit_log": str(audit_log),
        "refund_key_env": "TEST_REFUND_KEY",
        **sections.pop("admin", {}),
    }
    with serve_asgi(upstream) as upstream_url:
        config = gateway_config(
            [chain],
            upstream_url=upstream_url,
            store_url=store_url,
            pay_to=Account.create().address,
            routes=routes,
            admin=admin_section,
            **sections,
        )
        gateway: Gateway = build_app(config)
        admin = AdminApp(gateway)
        options: dict[str, Any] = {"log_level": "warning", "lifespan": "on", "timeout_graceful_shutdown": 2}
        public = ThreadedServer(uvicorn.Config(gateway, **options))
        side = ThreadedServer(uvicorn.Config(admin, **options))
        public_sock, admin_sock = _socket(), _socket()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(serve_both(public, side, public_sockets=[public_sock], admin_sockets=[admin_sock]))
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=run, daemon=True, name="gateway-and-admin")
        thread.start()
        deadline = time.monotonic() + 30
        while not side.started:
            if failed or not thread.is_alive() or time.monotonic() > deadline:
                stop_server_thread([public, side], thread, grace=2.0)
                raise RuntimeError(f"the gateway and its admin listener did not start: {failed}")
            time.sleep(0.01)
        try:
            yield Admin(
                url=f"http://127.0.0.1:{admin_sock.getsockname()[1]}",
                gateway=GatewayUnderTest(
                    url=f"http://127.0.0.1:{public_sock.getsockname()[1]}",
                    config=config,
                    upstream=upstream,
                    chains={network_name(chain): chain},
                    pay_to=config.payment.pay_to,
                    app=gateway,
                ),
                audit_log=audit_log,
                refund=refund,
                app=admin,
            )
        finally:
            try:
                stop_server_thread([public, side], thread, grace=20.0)
            finally:
                public_sock.close()
                admin_sock.close()
