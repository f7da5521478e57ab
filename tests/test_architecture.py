"""The package layout is the architecture: these tests hold its arrows one way.

Every module under ``gateway/`` is read with ``ast`` (nothing is imported, so a broken module cannot hide a
violation). Each import becomes an edge ``module -> imported module``, relative imports resolved; an edge
remembers whether it runs at import time (module level) or only when a function runs. The layering rules count
both kinds: a function-level import is still a dependency. Circles count only module-level edges, because only
those run while a module is being imported (a function-level import is the usual way to break one).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Libraries that do I/O (network, disk, event loop, servers, chains): the sans-IO protocol imports none of them.
IO_LIBRARIES = ("aiohttp", "httpx", "redis", "sqlite3", "socket", "asyncio", "uvicorn", "starlette", "web3")
# What the sans-IO protocol may build on: itself and the core vocabulary.
X402_MAY_IMPORT = ("gateway.x402", "gateway.errors", "gateway.money", "gateway.networks")
# The client SDK ships to people who run no gateway: protocol and core vocabulary only, never server code.
CLIENT_MAY_IMPORT = ("gateway.client", "gateway.x402", "gateway.networks", "gateway.money", "gateway.secrets")
# The one runtime place that may start the dev kit: the ``demo`` command.
DEV_KIT_ENTRY_POINTS = (("gateway.cli", "cmd_demo"),)


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module, e.g. gateway.jobs.auth
    target: str  # the imported module (or the package a name was imported from), absolute
    function: str | None  # the enclosing function's qualified name; None at module level
    typing_only: bool = False  # under ``if TYPE_CHECKING:``: never runs

    @property
    def at_import_time(self) -> bool:
        return self.function is None and not self.typing_only

    def __str__(self) -> str:
        where = f" (in {self.function})" if self.function else ""
        return f"{self.module} -> {self.target}{where}"


# ------------------------------------------------------------------------------------------------ reading


def module_names(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` under ``root/package`` (a package is its ``__init__``)."""
    names: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.scope: list[str] = []
        self.functions = 0
        self.typing_only = 0
        self.found: list[Import] = []

    def _add(self, target: str) -> None:
        function = ".".join(self.scope) if self.functions else None
        self.found.append(Import(self.module, target, function, self.typing_only > 0))

    def _base(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.package.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)])
        return f"{base}.{node.module}" if node.module else base

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._base(node)
        for alias in node.names:
            # ``from pkg import name``: the submodule pkg.name when there is one, else pkg itself.
            candidate = f"{base}.{alias.name}"
            self._add(candidate if candidate in self.known else base)

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, function: bool) -> None:
        self.scope.append(node.name)
        self.functions += function
        self.generic_visit(node)
        self.functions -= function
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped(node, True)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._scoped(node, True)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scoped(node, False)  # a class body runs at import time

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.typing_only += 1
        for child in node.body:
            self.visit(child)
        self.typing_only -= 1
        for child in node.orelse:
            self.visit(child)


def read_imports(root: Path, package: str = "gateway") -> list[Import]:
    """Every import statement of every module under ``root/package``."""
    files = module_names(root, package)
    known = set(files)
    found: list[Import] = []
    for module, path in files.items():
        visitor = _ImportVisitor(module, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text("utf-8"), filename=str(path)))
        found.extend(visitor.found)
    return found


# ------------------------------------------------------------------------------------------------ checking


def within(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def imports_outside(
    graph: Iterable[Import], package: str, allowed: Iterable[str], root: str = "gateway"
) -> list[Import]:
    """Imports of ``root`` modules from ``package`` that land outside the ``allowed`` packages."""
    allowed = tuple(allowed)
    return [
        i for i in graph if within(i.module, [package]) and within(i.target, [root]) and not within(i.target, allowed)
    ]


def imports_into(graph: Iterable[Import], package: str, forbidden: Iterable[str]) -> list[Import]:
    """Imports from ``package`` into any of the ``forbidden`` packages."""
    forbidden = tuple(forbidden)
    return [i for i in graph if within(i.module, [package]) and within(i.target, forbidden)]


def dev_kit_imports(graph: Iterable[Import], dev: str = "gateway.dev") -> list[Import]:
    """Runtime modules importing the dev kit (anvil, test token, demo), except the entry points that start it."""
    return [
        i
        for i in graph
        if within(i.target, [dev])
        and not within(i.module, [dev])
        and (i.module, i.function) not in DEV_KIT_ENTRY_POINTS
    ]


def import_edges(graph: Iterable[Import], root: str = "gateway") -> dict[str, set[str]]:
    """Module-level edges between ``root`` modules as Python runs them: importing ``gateway.a.b`` first runs the
    package ``gateway.a``, unless the importer sits in it (then it is already running). The root package itself
    is left out: every module would point at it."""
    edges: dict[str, set[str]] = {}
    for i in graph:
        edges.setdefault(i.module, set())
        if not i.at_import_time or not within(i.target, [root]):
            continue
        parts = i.target.split(".")
        for n in range(2, len(parts) + 1):
            target = ".".join(parts[:n])
            if target != i.module and not within(i.module, [target]):
                edges[i.module].add(target)
    return edges


def import_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = 0

    def successors(node: str) -> Iterator[str]:
        return iter(sorted(edges.get(node, ())))

    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, successors(start))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, successors(child)))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    circles.append(sorted(component))
    return sorted(circles)


def external_imports(graph: Iterable[Import], package: str, libraries: Iterable[str]) -> list[Import]:
    """Imports from ``package`` of any of the (top-level) ``libraries``."""
    libraries = set(libraries)
    return [i for i in graph if within(i.module, [package]) and i.target.split(".")[0] in libraries]


def report(rule: str, offending: list[Import]) -> str:
    lines = sorted({str(i) for i in offending})
    return f"{rule}: {len(lines)} offending import(s)\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------------- rules

GRAPH = read_imports(ROOT)


def test_the_reader_sees_the_whole_package() -> None:
    """Guards the rules below against passing on an empty graph (a moved root, a broken walk)."""
    modules = {i.module for i in GRAPH}
    assert {"gateway.cli", "gateway.x402.codec", "gateway.client._client", "gateway.http.middleware"} <= modules
    assert any(i.function is not None for i in GRAPH)  # function-level imports are read too


def test_x402_protocol_is_sans_io() -> None:
    offending = external_imports(GRAPH, "gateway.x402", IO_LIBRARIES)
    offending += imports_outside(GRAPH, "gateway.x402", X402_MAY_IMPORT)
    assert not offending, report("gateway.x402 imports no I/O and only the core vocabulary", offending)


def test_client_imports_only_protocol_and_core_vocabulary() -> None:
    offending = imports_outside(GRAPH, "gateway.client", CLIENT_MAY_IMPORT)
    assert not offending, report(f"gateway.client imports from gateway only {', '.join(CLIENT_MAY_IMPORT)}", offending)


def test_storage_imports_no_engine_http_or_schemes() -> None:
    offending = imports_into(GRAPH, "gateway.storage", ("gateway.engine", "gateway.http", "gateway.schemes"))
    assert not offending, report("gateway.storage imports neither engine, http nor schemes", offending)


def test_schemes_import_no_engine_or_http() -> None:
    offending = imports_into(GRAPH, "gateway.schemes", ("gateway.engine", "gateway.http"))
    assert not offending, report("gateway.schemes imports neither engine nor http", offending)


def test_engine_imports_no_http() -> None:
    offending = imports_into(GRAPH, "gateway.engine", ("gateway.http",))
    assert not offending, report("gateway.engine does not import http", offending)


def test_chain_imports_no_engine_schemes_http_or_storage() -> None:
    forbidden = ("gateway.engine", "gateway.schemes", "gateway.http", "gateway.storage")
    offending = imports_into(GRAPH, "gateway.chain", forbidden)
    assert not offending, report("gateway.chain imports none of engine, schemes, http, storage", offending)


def test_runtime_code_never_imports_the_dev_kit() -> None:
    offending = dev_kit_imports(GRAPH)
    assert not offending, report("only gateway.dev and the demo command import gateway.dev", offending)


def test_no_import_circles() -> None:
    circles = import_circles(import_edges(GRAPH))
    assert not circles, "module-level import circles:\n  " + "\n  ".join(" <-> ".join(c) for c in circles)


def test_the_command_line_parser_loads_no_wallet_or_http_library() -> None:
    """``x402-gateway check`` and every usage error stay fast: the client commands' options come from a light
    module and the SDK (eth_account alone takes ~0.7 s to import) loads only when a client command runs."""
    code = (
        "import sys, gateway.cli\n"
        "gateway.cli.build_parser()\n"
        "print(sorted(m for m in ('eth_account', 'httpx', 'web3') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ the checker itself


def test_the_checker_reports_a_synthetic_violating_package(tmp_path: Path) -> None:
    """A small package breaking every rule once: each checker must name the offending import, so a rule cannot
    pass because the reader or the checker went blind."""
    files = {
        "gateway/__init__.py": "",
        "gateway/cli.py": "def cmd_demo():\n    from gateway.dev import kit\n",
        "gateway/errors.py": "",
        "gateway/x402/__init__.py": "",
        "gateway/x402/codec.py": "import socket\nfrom .. import errors\nfrom ..engine import core\n",
        "gateway/client/__init__.py": "",
        "gateway/client/pay.py": "from gateway.x402 import codec\n\ndef sign():\n    from gateway.jobs.auth import x\n",
        "gateway/jobs/__init__.py": "",
        "gateway/jobs/auth.py": "x = 1\n",
        "gateway/engine/__init__.py": "",
        "gateway/engine/core.py": (
            "from typing import TYPE_CHECKING\nfrom gateway.x402.codec import y\n"
            "if TYPE_CHECKING:\n    from gateway.http import app\n"
        ),
        "gateway/http/__init__.py": "",
        "gateway/http/app.py": "from gateway.dev.kit import z\nfrom gateway.engine import core\n",
        "gateway/storage/__init__.py": "from . import store\n",
        "gateway/storage/store.py": "class Store:\n    from gateway.schemes.exact import check\n",
        "gateway/schemes/__init__.py": "",
        "gateway/schemes/exact/__init__.py": "",
        "gateway/schemes/exact/check.py": "def verify():\n    import gateway.http.app\n",
        "gateway/chain/__init__.py": "",
        "gateway/chain/rpc.py": "from gateway.storage import store\n",
        "gateway/dev/__init__.py": "",
        "gateway/dev/kit.py": "from gateway.chain import rpc\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = read_imports(tmp_path)

    def pairs(found: list[Import]) -> set[str]:
        return {f"{i.module} -> {i.target}" for i in found}

    assert pairs(external_imports(graph, "gateway.x402", IO_LIBRARIES)) == {"gateway.x402.codec -> socket"}
    assert pairs(imports_outside(graph, "gateway.x402", X402_MAY_IMPORT)) == {
        "gateway.x402.codec -> gateway.engine.core"  # relative, resolved; ``from .. import errors`` is allowed
    }
    assert pairs(imports_outside(graph, "gateway.client", CLIENT_MAY_IMPORT)) == {
        "gateway.client.pay -> gateway.jobs.auth"  # function level still counts
    }
    assert pairs(imports_into(graph, "gateway.storage", ("gateway.engine", "gateway.http", "gateway.schemes"))) == {
        "gateway.storage.store -> gateway.schemes.exact.check"  # a class body runs at import time
    }
    assert pairs(imports_into(graph, "gateway.schemes", ("gateway.engine", "gateway.http"))) == {
        "gateway.schemes.exact.check -> gateway.http.app"
    }
    assert pairs(imports_into(graph, "gateway.engine", ("gateway.http",))) == {
        "gateway.engine.core -> gateway.http.app"  # typing-only imports are still dependencies
    }
    assert pairs(imports_into(graph, "gateway.chain", ("gateway.storage",))) == {
        "gateway.chain.rpc -> gateway.storage.store"
    }
    assert pairs(dev_kit_imports(graph)) == {"gateway.http.app -> gateway.dev.kit"}  # cli's cmd_demo is allowed
    # x402.codec <-> engine.core at import time; engine.core -> http is typing-only and schemes -> http is in a
    # function, so neither closes a circle; storage -> storage.store is a package running its own module.
    assert import_circles(import_edges(graph)) == [["gateway.engine.core", "gateway.x402.codec"]]
    # And the report names each offending pair.
    message = report("rule", imports_outside(graph, "gateway.client", CLIENT_MAY_IMPORT))
    assert "gateway.client.pay -> gateway.jobs.auth (in sign)" in message
