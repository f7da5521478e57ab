"""Reusable test helpers: real uvicorn servers on free ports and a recording upstream (see ``servers``)."""

from .servers import (
    Behaviour,
    RecordedRequest,
    RecordingUpstream,
    raw_http,
    read_body,
    serve_asgi,
    serve_asgi_async,
)

__all__ = [
    "Behaviour",
    "RecordedRequest",
    "RecordingUpstream",
    "raw_http",
    "read_body",
    "serve_asgi",
    "serve_asgi_async",
]
