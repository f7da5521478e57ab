"""The v2 bazaar discovery extension (docs/protocol.md §6): what a discoverable route declares about itself.

:func:`bazaar_declaration` builds ``extensions.bazaar`` (``info.input`` + a JSON Schema validating it, the shape
the ``x402`` package's ``declare_discovery_extension`` builds and its facilitator validates) and
:func:`service_metadata` the optional ``resource`` fields a catalog shows. Two places send them: every 402 of a
discoverable route (:meth:`gateway.http.discovery.Discovery.challenge_extras`), and, in facilitator mode, the
payment payload the gateway forwards to ``/verify`` and ``/settle`` (:func:`declared_extensions`), which is where a
bazaar facilitator catalogs the resource. Pure functions of the config: no I/O.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.config import GatewayConfig, RouteConfig
from gateway.routes import normalise_path

QUERY_METHODS = ("GET", "HEAD", "DELETE")
BODY_METHODS = ("POST", "PUT", "PATCH")
CONTENT_TYPES = {"json": "application/json", "form-data": "multipart/form-data", "text": "text/plain"}
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Facilitators accept a routeTemplate only in this alphabet (x402 bazaar: catalog-poisoning defence).
_ROUTE_TEMPLATE = re.compile(r"^/[a-zA-Z0-9_/:.\-~%]+\Z")


def route_path(route: RouteConfig) -> str:
    """The path part of ``"METHOD /path"``, as configured."""
    return route.pattern.text.partition(" ")[2].strip()


def is_concrete(route: RouteConfig) -> bool:
    """No ``{param}``, ``*`` or ``**`` segment: the route is exactly one URL."""
    return not any(seg in {"*", "**"} or seg.startswith("{") for seg in route_path(route).split("/"))


def example_params(route: RouteConfig) -> dict[str, str]:
    """Path parameter values taken from the route's ``example_path``, by position."""
    if route.docs.example_path is None:
        return {}
    template = [s for s in route_path(route).split("/") if s]
    concrete = [s for s in normalise_path(route.docs.example_path).split("/") if s]
    values: dict[str, str] = {}
    for i, seg in enumerate(template):
        if seg == "**":
            values["path"] = "/".join(concrete[i:])
        elif seg == "*" and i < len(concrete):
            values["segment"] = concrete[i]
        elif seg.startswith("{") and i < len(concrete):
            values[seg[1:-1]] = concrete[i]
    return values


def bazaar_declaration(route: RouteConfig, method: str, path_params: dict[str, str]) -> dict[str, Any] | None:
    """The ``extensions.bazaar`` object for one request to ``route``: ``info`` (how to call it, with examples) and
    ``schema`` (a JSON Schema that ``info`` validates against, as facilitators check). None for a method the
    bazaar spec has no shape for (OPTIONS, ...)."""
    docs = route.docs
    method = method.upper()
    if method in QUERY_METHODS:
        info_input: dict[str, Any] = {"type": "http", "method": method}
        input_props: dict[str, Any] = {
            "type": {"type": "string", "const": "http"},
            "method": {"type": "string", "enum": list(QUERY_METHODS)},
            "queryParams": {"type": "object", **(docs.input_schema or {"properties": {}})},
        }
        if isinstance(docs.input_example, dict):
            info_input["queryParams"] = docs.input_example
        required = ["type", "method"]
    elif method in BODY_METHODS:
        info_input = {
            "type": "http",
            "method": method,
            "bodyType": docs.body_type,
            "body": docs.input_example if docs.input_example is not None else {},
        }
        input_props = {
            "type": {"type": "string", "const": "http"},
            "method": {"type": "string", "enum": list(BODY_METHODS)},
            "bodyType": {"type": "string", "enum": list(CONTENT_TYPES)},
            "body": docs.input_schema if docs.input_schema is not None else {},
        }
        required = ["type", "method", "bodyType", "body"]
    else:
        return None
    if path_params:
        info_input["pathParams"] = path_params
        input_props["pathParams"] = {
            "type": "object",
            "properties": {name: {"type": "string"} for name in path_params},
            "required": list(path_params),
        }
    properties: dict[str, Any] = {
        "input": {"type": "object", "properties": input_props, "required": required, "additionalProperties": False}
    }
    info: dict[str, Any] = {"input": info_input}
    if docs.output_schema is not None or docs.output_example is not None:
        info["output"] = {"type": "json" if "json" in route.mime_type else "text"}
        if docs.output_example is not None:
            info["output"]["example"] = docs.output_example
        properties["output"] = {
            "type": "object",
            "properties": {"type": {"type": "string"}, "example": docs.output_schema or {}},
            "required": ["type"],
        }
    declaration: dict[str, Any] = {
        "info": info,
        "schema": {"$schema": JSON_SCHEMA_DIALECT, "type": "object", "properties": properties, "required": ["input"]},
    }
    if path_params:
        template = route_path(route)
        for name in path_params:
            template = template.replace("{" + name + "}", ":" + name)
        if _ROUTE_TEMPLATE.match(template):
            declaration["routeTemplate"] = template
    return declaration


def service_metadata(config: GatewayConfig) -> dict[str, Any]:
    """The optional v2 ``resource`` fields a bazaar catalog shows (x402 ``ResourceInfo``)."""
    d = config.discovery
    meta: dict[str, Any] = {}
    if d.service_name:
        meta["serviceName"] = d.service_name
    if d.tags:
        meta["tags"] = list(d.tags)
    if d.icon_url:
        meta["iconUrl"] = d.icon_url
    return meta


def declared_extensions(
    config: GatewayConfig, route: RouteConfig, method: str, path_params: dict[str, str]
) -> dict[str, Any]:
    """The extensions this gateway declares for one request to ``route`` (``{}`` for a route that is not
    discoverable, or with the bazaar switched off): what the server, not the client, says about its resource."""
    if not (config.discovery.enabled and config.discovery.bazaar and route.docs.discoverable):
        return {}
    declaration = bazaar_declaration(route, method, path_params)
    return {} if declaration is None else {"bazaar": declaration}


def facilitator_listing(config: GatewayConfig, route: RouteConfig, method: str) -> dict[str, Any]:
    """The ``resource`` and ``extensions`` of a payment payload sent to a facilitator, which is where a bazaar
    facilitator catalogues a resource: ``{}`` unless discovery is on, the route discoverable and the gateway's public
    URL configured. Built from the configuration alone, never from the request: the client's Host header, path
    values or query would otherwise be catalogued next to the operator's name. A parametrised route is listed
    through its ``example_path`` (and its example values), or not at all."""
    d = config.discovery
    public_url = config.server.public_url
    if not (d.enabled and route.docs.discoverable and public_url):
        return {}
    if is_concrete(route):
        path, params = route_path(route), {}
    elif route.docs.example_path is not None:
        path, params = route.docs.example_path, example_params(route)
    else:
        return {}
    listing: dict[str, Any] = {
        "resource": {
            "url": public_url + path,
            "description": route.description,
            "mimeType": route.mime_type,
            **service_metadata(config),
        }
    }
    extensions = declared_extensions(config, route, method, params)
    if extensions:
        listing["extensions"] = extensions
    return listing


__all__ = [
    "BODY_METHODS",
    "CONTENT_TYPES",
    "QUERY_METHODS",
    "bazaar_declaration",
    "declared_extensions",
    "example_params",
    "facilitator_listing",
    "is_concrete",
    "route_path",
    "service_metadata",
]
