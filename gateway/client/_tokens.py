"""Where a client keeps the job access tokens its paid submits returned (``X-Job-Token``).

A token opens one job's status and cancel without the wallet. The client keeps them in memory by default; the CLI
uses :class:`FileTokenStore` so that ``status``/``cancel`` in a later process still find them. Without a token
the client falls back to the wallet signature (``X-Payer-Auth``), which opens every job the wallet paid for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from gateway.client._paths import state_file

__all__ = ["FileTokenStore", "MemoryTokenStore", "TokenStore", "default_token_file"]


class TokenStore(Protocol):
    def get(self, base_url: str, job_id: str) -> str | None: ...

    def put(self, base_url: str, job_id: str, token: str) -> None: ...


class MemoryTokenStore:
    """Tokens for the life of the client (the default)."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def get(self, base_url: str, job_id: str) -> str | None:
        with self._lock:
            return self._tokens.get((base_url, job_id))

    def put(self, base_url: str, job_id: str, token: str) -> None:
        with self._lock:
            self._tokens[(base_url, job_id)] = token


def default_token_file() -> Path:
    """``$X402_GATEWAY_JOBS_FILE``, else ``$XDG_CONFIG_HOME/x402-gateway/jobs.json`` (``~/.config`` by default)."""
    return state_file("X402_GATEWAY_JOBS_FILE", "jobs.json")


class FileTokenStore:
    """A small JSON file ``{base_url: {job_id: token}}``, mode 0600, the newest ``max_jobs`` kept.

    Writes are atomic (a temporary file renamed over the old one) under an advisory lock, so two CLI processes
    submitting at once both keep their tokens.
    """

    def __init__(self, path: Path | str | None = None, *, max_jobs: int = 1000) -> None:
        self.path = Path(path) if path is not None else default_token_file()
        self.max_jobs = max_jobs

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            doc: Any = json.loads(self.path.read_text("utf-8"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return {}
        if not isinstance(doc, dict):
            return {}
        return {
            str(url): {str(k): str(v) for k, v in jobs.items()} for url, jobs in doc.items() if isinstance(jobs, dict)
        }

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get(self, base_url: str, job_id: str) -> str | None:
        return self._read().get(base_url.rstrip("/"), {}).get(job_id)

    def put(self, base_url: str, job_id: str, token: str) -> None:
        with self._locked():
            doc = self._read()
            jobs = doc.setdefault(base_url.rstrip("/"), {})
            jobs.pop(job_id, None)
            jobs[job_id] = token  # insertion order = age
            excess = sum(len(j) for j in doc.values()) - self.max_jobs
            for url in list(doc):
                while excess > 0 and doc[url]:
                    del doc[url][next(iter(doc[url]))]
                    excess -= 1
                if not doc[url]:
                    del doc[url]
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".jobs-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(doc, fh, indent=1)
                os.replace(tmp, self.path)  # mkstemp made it 0600
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
