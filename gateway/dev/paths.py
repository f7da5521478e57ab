"""Where the dev kit finds its files: the installed package, and the checkout around it (``.tools/`` for anvil,
``contracts_abi/`` for the compiled contracts when not packaged).

Read as ``paths.REPO_ROOT`` at call time, never bound by value at import, so a test can point it elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import gateway

__all__ = ["PACKAGE_DIR", "REPO_ROOT"]

PACKAGE_DIR = Path(gateway.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
