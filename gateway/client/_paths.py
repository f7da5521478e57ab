"""Where the SDK and CLI keep their state on the payer's machine: one rule for every such file."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["state_file"]


def state_file(env_var: str, name: str) -> Path:
    """``$<env_var>`` if set, else ``$XDG_CONFIG_HOME/x402-gateway/<name>`` (``~/.config`` by default)."""
    explicit = os.environ.get(env_var)
    if explicit:
        return Path(explicit).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "x402-gateway" / name
