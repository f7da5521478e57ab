"""``[discovery]``, ``[paywall]`` and the per-route documentation keys of ``[[routes]]``: how x402scan, bazaar
facilitators, agents and browsers learn what a priced route takes, returns and costs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from gateway.config.server import ServerConfig
from gateway.config.table import Table
from gateway.config.values import local_path
from gateway.errors import ConfigError
from gateway.routes import RoutePattern, normalise_path

__all__ = ["BodyType", "DiscoveryConfig", "PaywallConfig", "RouteDocs", "parse_discovery", "parse_paywall"]

BodyType = Literal["json", "form-data", "text"]

_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]{1,32}\Z")


@dataclass(frozen=True, slots=True)
class RouteDocs:
    """What discovery publishes about a priced route (OpenAPI operation, bazaar extension, paywall).

    Schemas are JSON Schema objects, loaded at start from inline TOML tables or JSON files; treat them as read-only.
    """

    input_schema: dict[str, Any] | None = field(default=None, compare=False)  # query params or request body
    output_schema: dict[str, Any] | None = field(default=None, compare=False)  # the upstream's success answer
    input_example: Any = field(default=None, compare=False)  # must validate against input_schema
    output_example: Any = field(default=None, compare=False)
    body_type: BodyType = "json"  # POST/PUT/PATCH bodies: how input_schema/input_example travel
    example_path: str | None = None  # a concrete path of a parametrised route, listed in /.well-known/x402
    discoverable: bool = True  # false: left out of /.well-known/x402, /openapi.json and the bazaar extension


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """``[discovery]``: how x402scan, bazaar facilitators and agents find the priced routes."""

    enabled: bool = True
    well_known_path: str = "/.well-known/x402"  # "" turns it off; answered before route matching, never priced
    openapi_path: str = "/openapi.json"
    bazaar: bool = True  # put the v2 ``extensions.bazaar`` declaration into every 402 of a discoverable route
    service_name: str = ""  # v2 resource.serviceName and OpenAPI info.title (<= 32 printable ASCII)
    description: str = ""  # OpenAPI info.description
    version: str = "1.0.0"  # OpenAPI info.version: the version of YOUR API
    tags: tuple[str, ...] = ()  # v2 resource.tags (<= 5, each <= 32 printable ASCII)
    icon_url: str = ""  # v2 resource.iconUrl: an absolute https URL on a public host name


@dataclass(frozen=True, slots=True)
class PaywallConfig:
    """``[paywall]``: the HTML 402 page shown to browsers (Accept: text/html)."""

    enabled: bool = True


_DOCS = RouteDocs()
_DISCOVERY = DiscoveryConfig()
_PAYWALL = PaywallConfig()
_EXAMPLE_TYPES = (dict, list, str, int, float, bool)  # any JSON value


def parse_route_docs(t: Table, pattern: RoutePattern, base_dir: Path) -> RouteDocs:
    """The per-route discovery keys of a ``[[routes]]`` entry (``t`` is that entry)."""
    example_path = t.get("example_path", str, _DOCS.example_path) or None
    if example_path is not None and not (
        example_path.startswith("/") and pattern.regex.match(normalise_path(example_path))
    ):
        raise ConfigError(t.key("example_path"), f"must be a concrete path that {pattern.text!r} matches")
    return RouteDocs(
        input_schema=_json_schema(t, "input_schema", base_dir),
        output_schema=_json_schema(t, "output_schema", base_dir),
        input_example=t.get("input_example", _EXAMPLE_TYPES, _DOCS.input_example),
        output_example=t.get("output_example", _EXAMPLE_TYPES, _DOCS.output_example),
        body_type=t.choice("body_type", ("json", "form-data", "text"), _DOCS.body_type),
        example_path=example_path,
        discoverable=t.get("discoverable", bool, _DOCS.discoverable),
    )


def _json_schema(t: Table, name: str, base_dir: Path) -> dict[str, Any] | None:
    """A JSON Schema as an inline table, or a path (relative to the config file) to a ``.json`` file."""
    raw = t.get(name, (dict, str), None)
    if raw is None:
        return None
    if isinstance(raw, str):
        path = base_dir / raw
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(t.key(name), f"cannot read {path}: {exc.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(t.key(name), f"{path} is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(t.key(name), f"{path} must hold a JSON object (a JSON Schema)")
    if _external_reference(raw):
        # Facilitators refuse schemas that point outside themselves (a $ref is a fetch: SSRF), and so would
        # every listing built from them.
        raise ConfigError(t.key(name), 'may only use same-document references ("$ref": "#/...")')
    schema: dict[str, Any] = raw
    return schema


def _external_reference(node: Any) -> bool:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$id") and not (isinstance(value, str) and value.startswith("#")):
                return True
            if _external_reference(value):
                return True
    elif isinstance(node, list):
        return any(_external_reference(item) for item in node)
    return False


def parse_discovery(t: Table, server: ServerConfig) -> DiscoveryConfig:
    service_name = t.get("service_name", str, _DISCOVERY.service_name)
    if service_name and not _PRINTABLE_ASCII.match(service_name):
        raise ConfigError(t.key("service_name"), "must be 1 to 32 printable ASCII characters")
    tags = t.get("tags", list, list(_DISCOVERY.tags))
    if len(tags) > 5:
        raise ConfigError(t.key("tags"), "at most 5 tags")
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not _PRINTABLE_ASCII.match(tag):
            raise ConfigError(f"{t.key('tags')}[{i}]", "must be 1 to 32 printable ASCII characters")
    icon_url = t.get("icon_url", str, _DISCOVERY.icon_url)
    if icon_url:
        parts = urlsplit(icon_url)
        # Facilitators drop icons on http, IP literals, localhost or with userinfo: say so at start instead.
        if parts.scheme != "https" or not parts.hostname or "@" in parts.netloc or len(icon_url) > 2048:
            raise ConfigError(t.key("icon_url"), "must be an absolute https:// URL without user info")
    cfg = DiscoveryConfig(
        enabled=t.get("enabled", bool, _DISCOVERY.enabled),
        well_known_path=local_path(t, "well_known_path", _DISCOVERY.well_known_path),
        openapi_path=local_path(t, "openapi_path", _DISCOVERY.openapi_path),
        bazaar=t.get("bazaar", bool, _DISCOVERY.bazaar),
        service_name=service_name,
        description=t.get("description", str, _DISCOVERY.description),
        version=t.get("version", str, _DISCOVERY.version) or _DISCOVERY.version,
        tags=tuple(tags),
        icon_url=icon_url,
    )
    # Each of these paths is answered before route matching: two of them on one path would hide one.
    taken = {server.health_path, server.ready_path, server.metrics_path} - {""}
    for name in ("well_known_path", "openapi_path"):
        path = getattr(cfg, name)
        if path and path in taken:
            raise ConfigError(t.key(name), "must differ from the health, ready and metrics paths")
        taken.add(path)
    t.done()
    return cfg


def parse_paywall(t: Table) -> PaywallConfig:
    cfg = PaywallConfig(enabled=t.get("enabled", bool, _PAYWALL.enabled))
    t.done()
    return cfg
