"""x402 pay-per-request gateway: an ASGI payment middleware and a reverse proxy built on it.

The public API, importable from here::

    from gateway import PaymentMiddleware, build_app, load_config

Names load on first use (PEP 562), so ``import gateway.client`` (the SDK) never pulls in the server.
The package layout is described in docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, load_config
    from gateway.http.app import Gateway, build_app
    from gateway.http.middleware import PaymentMiddleware

_PUBLIC = {
    "GatewayConfig": "gateway.config",
    "load_config": "gateway.config",
    "Gateway": "gateway.http.app",
    "build_app": "gateway.http.app",
    "PaymentMiddleware": "gateway.http.middleware",
}

__all__ = ["Gateway", "GatewayConfig", "PaymentMiddleware", "build_app", "load_config"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
