"""``X402Client``: the synchronous face of :class:`AsyncX402Client`.

It owns an event loop running in a daemon thread and hands every call to it, so it works the same from plain
scripts, from threads, and from inside a running event loop (where ``asyncio.run`` would refuse). Callbacks
(``on_update``, ``on_poll``) run on that loop's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import httpx

from gateway.client._channels import SessionChannel
from gateway.client._client import AsyncX402Client, OnPoll, OnUpdate
from gateway.client._errors import X402ClientError
from gateway.client._models import Job, JobList, JobsHealth, SubmitResult
from gateway.client._sessions import SessionRefund

__all__ = ["X402Client"]

T = TypeVar("T")


class X402Client:
    """Takes the same arguments as :class:`AsyncX402Client`; every method blocks until done."""

    def __init__(self, base_url: str = "", **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="x402-client", daemon=True)
        self._thread.start()
        self._closed = False

        async def make() -> AsyncX402Client:
            return AsyncX402Client(base_url, **kwargs)

        try:
            self.aio: AsyncX402Client = self._run(make())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __repr__(self) -> str:
        return repr(self.aio).replace("AsyncX402Client", "X402Client", 1)

    def __enter__(self) -> X402Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._run(self.aio.aclose())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def spent(self) -> int:
        return self.aio.spent

    @property
    def remaining_budget(self) -> int | None:
        return self.aio.remaining_budget

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._run(self.aio.request(method, url, **kwargs))

    def prompt(self, text: str, **kwargs: Any) -> SubmitResult:
        return self._run(self.aio.prompt(text, **kwargs))

    def prompt_and_wait(self, text: str, **kwargs: Any) -> Job:
        return self._run(self.aio.prompt_and_wait(text, **kwargs))

    def get_job_status(self, job_id: str, *, token: str | None = None) -> Job:
        return self._run(self.aio.get_job_status(job_id, token=token))

    def poll_job(
        self,
        job_id: str,
        *,
        interval: float = 2.0,
        max_attempts: int = 150,
        timeout: float = 300.0,
        backoff: float = 1.0,
        max_interval: float | None = None,
        on_update: OnUpdate | None = None,
        on_poll: OnPoll | None = None,
        token: str | None = None,
    ) -> Job:
        return self._run(
            self.aio.poll_job(
                job_id,
                interval=interval,
                max_attempts=max_attempts,
                timeout=timeout,
                backoff=backoff,
                max_interval=max_interval,
                on_update=on_update,
                on_poll=on_poll,
                token=token,
            )
        )

    def cancel_job(self, job_id: str, *, token: str | None = None) -> Job:
        return self._run(self.aio.cancel_job(job_id, token=token))

    def list_jobs(self, *, status: str | None = None, limit: int | None = None) -> JobList:
        return self._run(self.aio.list_jobs(status=status, limit=limit))

    def get_jobs_health(self) -> JobsHealth:
        return self._run(self.aio.get_jobs_health())

    def batch_prompts(self, prompts: Iterable[str], **kwargs: Any) -> list[Job | X402ClientError]:
        return self._run(self.aio.batch_prompts(prompts, **kwargs))

    def open_session(self, url: str, **kwargs: Any) -> SessionChannel:
        return self._run(self.aio.open_session(url, **kwargs))

    def refund_session(self, url: str, **kwargs: Any) -> SessionRefund:
        return self._run(self.aio.refund_session(url, **kwargs))

    def session_channels(self, url: str | None = None) -> list[SessionChannel]:
        return self.aio.session_channels(url)

    def get(self, url: str, *, params: Mapping[str, str | int] | None = None, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, params=params, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)
