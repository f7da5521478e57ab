"""``GET /admin/config``: the live configuration as JSON, with every secret masked.

Two layers, so that a secret added to the configuration later cannot slip through one of them: every
:class:`~gateway.secrets.Secret` shows its label (``"$X402_RELAYER_KEY"``, a redacted URL), never its value; and every
string that remains passes the log redactor loaded with the configuration's secrets (gateway/ops/logs.py), which
also masks credentials a plain string field could hold (an upstream URL's user info, a key-shaped hex value).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from decimal import Decimal
from pathlib import PurePath
from typing import Any

from gateway.config import GatewayConfig
from gateway.ops.logs import SecretRedactor, config_secrets
from gateway.routes import RoutePattern
from gateway.secrets import Secret

__all__ = ["masked_config", "plain"]


def masked_config(config: GatewayConfig, *, more_secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """``config`` as a JSON-able document, secrets masked (``more_secrets``: values to mask besides the config's own,
    e.g. the admin tokens, which :func:`config_secrets` does not know about)."""
    redactor = SecretRedactor()
    redactor.add([*config_secrets(config), *more_secrets])
    doc = _plain(config, redactor)
    assert isinstance(doc, dict)
    return doc


def plain(value: Any) -> Any:
    """Any configuration-like value (dataclasses, mappings, secrets) as JSON-able data, secrets as their labels."""
    return _plain(value, SecretRedactor())


def _plain(value: Any, redactor: SecretRedactor) -> Any:
    if isinstance(value, Secret):
        return repr(value)  # "Secret($NAME)" / "Secret(redis://:***@host)": the label, never the value
    if isinstance(value, str):
        return redactor.redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value, redactor)
    if isinstance(value, RoutePattern):
        return value.text
    if isinstance(value, Decimal | PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), redactor) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v, redactor) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(_plain(v, redactor) for v in value)
    if isinstance(value, list | tuple):
        return [_plain(v, redactor) for v in value]
    return redactor.redact(str(value))  # anything else shows what its str() shows, redacted
