"""Discovery: how x402scan, bazaar facilitators and agents find, price and call the priced routes (docs/protocol.md §6).

Three views of the same ``[[routes]]``, all built from the config and answered before route matching (never
priced, never proxied):

* ``GET /.well-known/x402`` -> ``{"version": 1, "resources": [absolute URLs]}``: one URL per discoverable route
  whose path is concrete. A parametrised or wildcard route (``/weather/{city}``, ``/files/*``) has no single URL:
  it is listed only through its ``example_path`` (a concrete path it matches), and is otherwise described by its
  templated path in the OpenAPI document alone.
* ``GET /openapi.json`` -> OpenAPI 3.1, one operation per priced method with ``x-payment-info`` (price in USD),
  the ``402`` response, ``parameters``/``requestBody`` from the route's ``input_schema``.
* :meth:`Discovery.challenge_extras` gives the payment middleware, for every 402 of a discoverable route, the v2
  ``extensions.bazaar`` declaration (``info.input`` + a JSON Schema validating it, the shape the ``x402``
  package's ``declare_discovery_extension`` builds and its facilitator validates) and the service metadata
  (``resource.serviceName/tags/iconUrl``); the 402 is built with them, never decoded and re-encoded.

URLs are absolute: ``server.public_url`` when set (behind a TLS-terminating proxy the scheme we see is http,
and x402scan refuses non-https resources), else the request's own scheme and host.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from gateway.bazaar import (
    BODY_METHODS,
    CONTENT_TYPES,
    bazaar_declaration,
    declared_extensions,
    example_params,
    is_concrete,
    route_path,
    service_metadata,
)
from gateway.config import GatewayConfig, RouteConfig
from gateway.http.asgi import Scope, Send
from gateway.http.context import origin
from gateway.money import format_usd
from gateway.schemes.base import PricedRoute
from gateway.x402 import reasons
from gateway.x402.codec import dumps

# What an "any method" route is documented as: the two methods agents call; a body-less request with any other
# method still gets its 402.
ANY_METHOD_DOCUMENTED = ("GET", "POST")

# ------------------------------------------------------------------------------------------------ route shapes


def documented_methods(route: RouteConfig) -> tuple[str, ...]:
    """The methods an OpenAPI document lists for ``route``. HEAD goes with GET implicitly (x402scan, too, treats
    a HEAD operation next to a GET as generated noise)."""
    methods = route.pattern.methods
    if methods is None:
        return ANY_METHOD_DOCUMENTED
    listed = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD") if m in methods]
    if "GET" in listed and "HEAD" in listed:
        listed.remove("HEAD")
    return tuple(listed)


def templated_path(route: RouteConfig) -> tuple[str, list[tuple[str, str]]]:
    """``/files/*`` -> ``/files/{segment}``; ``/api/**`` -> ``/api/{path}``; and the path parameters, each with a
    description. OpenAPI has no multi-segment parameter: ``{path}`` is documented as "may contain /"."""
    out: list[str] = []
    params: list[tuple[str, str]] = []
    for seg in route_path(route).strip("/").split("/"):
        if not seg:
            continue
        if seg == "**":
            out.append("{path}")
            params.append(("path", "the rest of the path; may contain '/'"))
        elif seg == "*":
            out.append("{segment}")
            params.append(("segment", "one path segment"))
        elif seg.startswith("{"):
            out.append(seg)
            params.append((seg[1:-1], ""))
        else:
            out.append(seg)
    trailing = "/" if route_path(route).endswith("/") and out else ""
    return "/" + "/".join(out) + trailing, params


# ------------------------------------------------------------------------------------------------ documents


class Discovery:
    """Serves the two discovery documents. Built once from the config; each document is cached per origin."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.routes: tuple[RouteConfig, ...] = tuple(r for r in config.routes if r.docs.discoverable)
        d = config.discovery
        self._documents = {
            path: builder for path, builder in ((d.well_known_path, self.well_known), (d.openapi_path, self.openapi))
        }
        self._documents.pop("", None)
        self.paths = frozenset(self._documents)
        # Without public_url the origin comes from the Host header: bound the cache, anyone can send any Host.
        self._render = functools.lru_cache(maxsize=16)(self._render_uncached)
        self.metadata = service_metadata(config)

    def challenge_extras(
        self, route: PricedRoute, method: str, params: dict[str, str]
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(extensions, resource metadata)`` for a 402 of ``route``; nothing for a route kept out of discovery."""
        if not route.config.docs.discoverable:
            return None, None
        return declared_extensions(self.config, route.config, method, params) or None, self.metadata

    async def serve(self, scope: Scope, send: Send) -> None:
        method = scope["method"]
        cors = [(b"access-control-allow-origin", b"*")]
        if method == "OPTIONS":
            headers = [*cors, (b"allow", b"GET, HEAD, OPTIONS"), (b"access-control-allow-methods", b"GET, HEAD")]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if method not in ("GET", "HEAD"):
            body = dumps({"error": reasons.METHOD_NOT_ALLOWED, "message": "discovery documents are read with GET"})
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"allow", b"GET, HEAD, OPTIONS"),
            ]
            await send({"type": "http.response.start", "status": 405, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        body = self._render(scope["path"], origin(scope, self.config.server))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"public, max-age=300"),
            *cors,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    def _render_uncached(self, path: str, origin: str) -> bytes:
        return dumps(self._documents[path](origin))

    def well_known(self, origin: str) -> dict[str, Any]:
        urls: list[str] = []
        for route in self.routes:
            path = route_path(route) if is_concrete(route) else route.docs.example_path
            if path is not None and origin + path not in urls:
                urls.append(origin + path)
        return {"version": 1, "resources": urls}

    def openapi(self, origin: str) -> dict[str, Any]:
        d = self.config.discovery
        info: dict[str, Any] = {"title": d.service_name or "x402 gateway", "version": d.version}
        if d.description:
            info["description"] = d.description
        paths: dict[str, dict[str, Any]] = {}
        seen: set[tuple[str, str]] = set()
        for route in self.routes:
            template, params = templated_path(route)
            for method in documented_methods(route):
                if (template, method) in seen:
                    continue  # first match wins at run time, so the first route is the one that prices it
                seen.add((template, method))
                paths.setdefault(template, {})[method.lower()] = self._operation(route, method, params)
        doc: dict[str, Any] = {
            "openapi": "3.1.0",
            "info": info,
            "servers": [{"url": origin}],
            "paths": paths,
            "components": {"schemas": {"PaymentRequiredV1": _PAYMENT_REQUIRED_V1}},
        }
        if d.tags:
            doc["tags"] = [{"name": tag} for tag in d.tags]
        return doc

    def _operation(self, route: RouteConfig, method: str, path_params: Sequence[tuple[str, str]]) -> dict[str, Any]:
        docs = route.docs
        examples = example_params(route)
        summary = route.description or route.pattern.text
        op: dict[str, Any] = {
            "operationId": _operation_id(method, route_path(route)),
            "summary": summary,
        }
        if route.description:
            op["description"] = route.description
        if self.config.discovery.tags:
            op["tags"] = list(self.config.discovery.tags)
        parameters: list[dict[str, Any]] = []
        for name, description in path_params:
            schema: dict[str, Any] = {"type": "string"}
            if name in examples:
                schema["example"] = examples[name]
            param = {"name": name, "in": "path", "required": True, "schema": schema}
            if description:
                param["description"] = description
            parameters.append(param)
        if method in BODY_METHODS:
            if docs.input_schema is not None or docs.input_example is not None:
                media: dict[str, Any] = {"schema": docs.input_schema or {}}
                if docs.input_example is not None:
                    media["example"] = docs.input_example
                op["requestBody"] = {"required": True, "content": {CONTENT_TYPES[docs.body_type]: media}}
        elif docs.input_schema is not None:
            required = set(docs.input_schema.get("required") or ())
            example = docs.input_example if isinstance(docs.input_example, dict) else {}
            for name, prop in (docs.input_schema.get("properties") or {}).items():
                query: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
                if name in example:
                    query["example"] = example[name]
                parameters.append(query)
        if parameters:
            op["parameters"] = parameters
        success: dict[str, Any] = {
            "description": "Paid: the upstream's answer, with the settlement receipt",
            "headers": {
                "PAYMENT-RESPONSE": {
                    "description": "base64 JSON settlement receipt (X-PAYMENT-RESPONSE for x402 v1 clients)",
                    "schema": {"type": "string"},
                }
            },
        }
        if docs.output_schema is not None or docs.output_example is not None:
            out_media: dict[str, Any] = {"schema": docs.output_schema or {}}
            if docs.output_example is not None:
                out_media["example"] = docs.output_example
            success["content"] = {route.mime_type or "application/octet-stream": out_media}
        op["responses"] = {
            "200": success,
            "402": {
                "description": "Payment Required: pay with x402 (v2 PAYMENT-SIGNATURE or v1 X-PAYMENT) and retry",
                "headers": {
                    "PAYMENT-REQUIRED": {
                        "description": "base64 JSON x402 v2 PaymentRequired (accepts, resource, extensions)",
                        "schema": {"type": "string"},
                    }
                },
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PaymentRequiredV1"}}},
            },
        }
        op["x-payment-info"] = {
            "protocols": [{"x402": {}}],
            "price": {"mode": "fixed", "currency": "USD", "amount": format_usd(route.price)},
        }
        return op


def _operation_id(method: str, path: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root"
    return f"{method.lower()}_{slug}"


_PAYMENT_REQUIRED_V1: dict[str, Any] = {
    "type": "object",
    "required": ["x402Version", "error", "accepts"],
    "properties": {
        "x402Version": {"const": 1},
        "error": {"type": "string"},
        "message": {"type": "string"},
        "accepts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "scheme",
                    "network",
                    "maxAmountRequired",
                    "resource",
                    "payTo",
                    "asset",
                    "maxTimeoutSeconds",
                ],
                "properties": {
                    "scheme": {"type": "string"},
                    "network": {"type": "string"},
                    "maxAmountRequired": {"type": "string", "pattern": "^[0-9]+$"},
                    "resource": {"type": "string", "format": "uri"},
                    "description": {"type": "string"},
                    "mimeType": {"type": "string"},
                    "payTo": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
                    "asset": {"type": "string"},
                    "maxTimeoutSeconds": {"type": "integer", "minimum": 1},
                    "extra": {"type": "object"},
                },
            },
        },
    },
}


__all__ = ["Discovery", "bazaar_declaration", "service_metadata"]
