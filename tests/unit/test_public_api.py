"""The package's public API: every name in ``gateway.__all__`` resolves, and the SDK never loads the server."""

from __future__ import annotations

import subprocess
import sys

import gateway


def test_every_public_name_resolves() -> None:
    assert sorted(gateway.__all__) == ["Gateway", "GatewayConfig", "PaymentMiddleware", "build_app", "load_config"]
    for name in gateway.__all__:
        assert getattr(gateway, name).__name__ == name


def test_importing_the_sdk_loads_no_server_module() -> None:
    code = (
        "import sys, gateway.client; "
        "loaded = sorted(m for m in sys.modules if m.startswith(('gateway.http', 'gateway.engine', "
        "'gateway.storage', 'gateway.chain', 'gateway.schemes', 'gateway.config'))); print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
