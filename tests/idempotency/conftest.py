"""Idempotency fixtures: ``store_url`` runs a test once per backend (SQLite file, real Redis); ``idempotent_gateway``
serves a real gateway (dev chain, recording upstream) wrapped in an :class:`IdempotencyLayer` on the same store URL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx

from gateway.dev.chain import DevChain
from gateway.http.app import Gateway
from tests.support.gateway import GatewayUnderTest, running_gateway

PRICE = 100_000  # POST /paid and POST /paid-before (tests/support/gateway.py DEFAULT_ROUTES)


@contextlib.contextmanager
def idempotent_gateway(
    chain: DevChain,
    *,
    store_url: str,
    routes: list[dict[str, Any]] | None = None,
    upstream: Any = None,
    max_body_bytes: int | None = None,
    max_stored_body_bytes: int | None = None,
) -> Iterator[GatewayUnderTest]:
    """The standalone gateway with its built-in ``[idempotency]`` layer on the receipt store's URL."""
    idempotency: dict[str, Any] = {"enabled": True}
    if max_stored_body_bytes is not None:
        idempotency["max_stored_body_bytes"] = max_stored_body_bytes
    sections: dict[str, Any] = {"idempotency": idempotency}
    if max_body_bytes is not None:
        sections["server"] = {"max_body_bytes": max_body_bytes}
    with running_gateway(chain, store_url=store_url, routes=routes, upstream=upstream, **sections) as gw:
        assert isinstance(gw.app, Gateway) and gw.app.idempotency is not None
        yield gw


def pay(gw: GatewayUnderTest, payer: Any, path: str = "/paid") -> tuple[str, str]:
    challenge = httpx.post(gw.url + path)
    assert challenge.status_code == 402, challenge.text
    return gw.sign(payer, challenge)
