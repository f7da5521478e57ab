"""Barrier-released request storms: the concurrency probe the replay and tx-hash suites share."""

from __future__ import annotations

import ssl
import threading

import httpx


def fire_together(
    url: str | list[str],
    method: str,
    path: str,
    headers: dict[str, str] | list[dict[str, str]],
    n: int,
) -> list[httpx.Response]:
    """``n`` requests from ``n`` threads, each on a warmed-up keep-alive connection, released by one barrier.

    ``headers``: one dict for all, or one per request. Several ``url``s (gateway instances) take the requests in
    turn. The clients share one TLS context (never used: plain http): building one per client costs ~40 ms of CPU
    each, long enough for the first warmed-up connections to hit uvicorn's 5 s keep-alive timeout."""
    urls = [url] if isinstance(url, str) else url
    barrier = threading.Barrier(n)
    tls = ssl.create_default_context()
    results: list[httpx.Response | BaseException | None] = [None] * n

    def worker(i: int) -> None:
        try:
            with httpx.Client(base_url=urls[i % len(urls)], timeout=60, verify=tls) as client:
                client.get("/healthz")
                barrier.wait(timeout=30)
                mine = headers[i] if isinstance(headers, list) else headers
                results[i] = client.request(method, path, headers=mine)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    out: list[httpx.Response] = []
    for r in results:
        if not isinstance(r, httpx.Response):
            raise AssertionError(f"a concurrent request failed: {r!r}")
        out.append(r)
    return out
