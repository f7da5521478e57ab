"""``build_app(config)``: the standalone gateway — health endpoints, then the payment middleware, then the proxy.

Composition is plain ASGI: ``Health -> PaymentMiddleware -> UpstreamProxy``. Health paths are answered before
any route matching, so they can never be priced or proxied.
"""

from __future__ import annotations

from .asgi import ASGIApp, Message, Receive, Scope, Send, send_json
from .config import GatewayConfig
from .middleware import PaymentMiddleware
from .proxy import UpstreamProxy

HEALTH_PATH = "/healthz"


class Gateway:
    """The standalone reverse proxy as one ASGI app (``uvicorn gateway.app:...`` via ``x402-gateway serve``)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        up = config.upstream
        self.proxy = UpstreamProxy(
            up.url,
            inject_headers={name: value.reveal() for name, value in up.headers},
            connect_timeout=up.connect_timeout,
            read_timeout=up.read_timeout,
            max_connections=up.max_connections,
            max_body_bytes=config.server.max_body_bytes,
            body_read_timeout=config.server.body_read_timeout,
            public_scheme=_scheme(config.server.public_url),
        )
        self.payments = PaymentMiddleware(self.proxy, config=config)
        self._app: ASGIApp = self.payments

    async def startup(self) -> None:
        await self.proxy.start()
        try:
            await self.payments.startup()
        except BaseException:
            await self.proxy.aclose()
            raise

    async def shutdown(self) -> None:
        await self.payments.shutdown()
        await self.proxy.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "http" and scope["path"] == HEALTH_PATH:
            await send_json(send, 200, {"status": "ok"})
            return
        await self._app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # the server prints it and exits non-zero
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _scheme(public_url: str | None) -> str | None:
    return public_url.split("://", 1)[0] if public_url else None


def build_app(config: GatewayConfig) -> Gateway:
    return Gateway(config)
