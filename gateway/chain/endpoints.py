"""The health of one network's RPC endpoints: scores, ranking, and hedged reads (docs/threat-model.md T18, T42).

Split from :mod:`gateway.chain.rpc` (which owns sending, coalescing, chain-id checks and quorum reads) so the
rules that decide *which* endpoint a call goes to read in one place. Each endpoint keeps the moving averages
(EWMA) of its answer time and of its failures; calls go to the best one, kept while it stays within a margin of
the others (so consecutive calls see one node's view); a failure cools the endpoint off (1 s, doubling to 30 s).
A read the best endpoint has not answered in time is also sent to the next one, and the first answer wins;
writes and nonce reads are never hedged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.config import Secret
from gateway.errors import ChainUnavailable

log = logging.getLogger("gateway.chain")

_ALPHA = 0.3  # weight of the newest sample in an endpoint's moving averages
_COOL_OFF = (1.0, 30.0)  # seconds an endpoint rests after a failure: first, and at most (doubling in between)
_STICKY = 1.25  # the endpoint in use stays while its score is within this factor (+10 ms) of the best one's
# Reads that may go to two endpoints at once. Not the nonce: the relayer must see its own node's pending count.
_HEDGED_READS = frozenset(
    {
        "eth_blockNumber",
        "eth_call",
        "eth_chainId",
        "eth_estimateGas",
        "eth_feeHistory",
        "eth_gasPrice",
        "eth_getBalance",
        "eth_getBlockByHash",
        "eth_getBlockByNumber",
        "eth_getCode",
        "eth_getLogs",
        "eth_getStorageAt",
        "eth_getTransactionByHash",
        "eth_getTransactionReceipt",
        "eth_maxPriorityFeePerGas",
        "net_version",
    }
)


@dataclass(slots=True, eq=False)
class Endpoint:
    """One RPC URL and what the gateway has seen of it."""

    index: int
    url: Secret
    state: Literal["unverified", "ok", "wrong_chain"] = "unverified"
    latency: float | None = None  # EWMA of its answer time, seconds
    errors: float = 0.0  # EWMA of its failures (0: always answers, 1: never)
    failures: int = 0  # in a row
    cool_until: float = 0.0
    last_seen: float = float("-inf")  # when it last answered or failed
    probing: bool = False
    chain_seen: int | None = None
    sync_send: bool | None = None  # offers eth_sendRawTransactionSync (None: not known yet)
    sync_probes: int = 0  # probes for it that got no answer

    @property
    def score(self) -> float:
        return (self.latency or 0.0) * (1.0 + 4.0 * self.errors) + 2.0 * self.errors

    def answered(self, seconds: float) -> None:
        self.latency = seconds if self.latency is None else (1 - _ALPHA) * self.latency + _ALPHA * seconds
        self.errors *= 1 - _ALPHA
        self.failures = 0
        self.cool_until = 0.0
        self.last_seen = asyncio.get_running_loop().time()

    def failed(self) -> None:
        now = asyncio.get_running_loop().time()
        self.errors = (1 - _ALPHA) * self.errors + _ALPHA
        self.failures += 1
        self.cool_until = now + min(_COOL_OFF[1], _COOL_OFF[0] * 2 ** (self.failures - 1))
        self.last_seen = now

    def outpaced(self, seconds: float) -> None:
        """Another endpoint answered first; this one had not answered after ``seconds`` (a lower bound)."""
        latency = self.latency
        self.latency = seconds if latency is None else (1 - _ALPHA) * latency + _ALPHA * max(seconds, latency)
        self.last_seen = asyncio.get_running_loop().time()


def hedgeable(body: Any) -> bool:
    items = body if isinstance(body, list) else [body]
    return all(isinstance(item, dict) and item.get("method") in _HEDGED_READS for item in items)


def ranked(endpoints: list[Endpoint], preferred: int) -> list[Endpoint]:
    """The endpoints to use, best first: resting ones last, the one in use (``preferred``) first while it stays
    close to the best (so that consecutive calls see one node's view of the chain)."""
    now = asyncio.get_running_loop().time()
    usable = [ep for ep in endpoints if ep.state == "ok"]
    ready = sorted((ep for ep in usable if ep.cool_until <= now), key=lambda ep: (ep.score, ep.index))
    resting = sorted((ep for ep in usable if ep.cool_until > now), key=lambda ep: ep.cool_until)
    if len(ready) > 1:
        current = next((ep for ep in ready if ep.index == preferred), None)
        if current is not None and current is not ready[0] and current.score <= ready[0].score * _STICKY + 0.01:
            ready.remove(current)
            ready.insert(0, current)
    return ready + resting


async def hedged(
    order: list[Endpoint],
    ask: Callable[[Endpoint], Awaitable[Any]],
    *,
    hedge_after: float,
    timeout: float,
    network: str,
) -> tuple[Endpoint, Any]:
    """``ask`` the best endpoint; if it has not answered within ``hedge_after`` (or three times its usual answer
    time), the next one too, and so on; the first answer wins (with the endpoint that gave it). A failure fails over
    at once; the endpoints left running are cancelled and scored as outpaced."""
    loop = asyncio.get_running_loop()
    delay = min(max(hedge_after, 3.0 * (order[0].latency or 0.0)), timeout)
    waiting = list(order)
    running: dict[asyncio.Future[Any], tuple[Endpoint, float]] = {}
    last: ChainUnavailable | None = None

    def launch() -> None:
        ep = waiting.pop(0)
        running[asyncio.ensure_future(ask(ep))] = (ep, loop.time())

    launch()
    try:
        while running:
            done, _ = await asyncio.wait(
                running, timeout=delay if waiting else None, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                launch()  # the best one is slow today: ask the next one too, take whichever answers first
                continue
            winner: tuple[Endpoint, Any] | None = None
            for task in done:
                ep, _ = running.pop(task)
                exc = task.exception()
                if exc is None:
                    winner = winner or (ep, task.result())
                elif isinstance(exc, ChainUnavailable):
                    last = exc
                    log.warning("rpc endpoint failed", extra={"network": network, "endpoint": ep.index})
                else:
                    raise exc
            if winner is not None:
                return winner
            if not running and waiting:
                launch()  # it failed: fail over at once
    finally:
        now = loop.time()
        current = asyncio.current_task()
        caller_cancelled = current is not None and current.cancelling() > 0
        for task, (ep, started) in running.items():
            task.cancel()
            if not caller_cancelled:
                ep.outpaced(now - started)
    assert last is not None
    raise last


__all__ = ["Endpoint", "hedgeable", "hedged", "ranked"]
