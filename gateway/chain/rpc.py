"""Async JSON-RPC access to one EVM network, over the gateway's pooled aiohttp session.

Why not ``web3.AsyncWeb3``: the gateway needs a handful of calls on the hot path, batched into one HTTP round
trip (nonce state + balance + simulation), with failover between several endpoints and errors that never echo
an RPC URL (those embed API keys). Encoding comes from ``eth_abi`` (web3's codec) via :mod:`gateway.abi`.
Raw JSON-RPC also reads Polygon's proof-of-authority blocks as they are, so no POA middleware is needed.

A JSON-RPC *error answer* (a revert, "nonce too low") is a real answer and raises :class:`RpcError`; no
answer at all raises :class:`~gateway.errors.ChainUnavailable` (503, fail closed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from gateway.config import Secret
from gateway.errors import ChainUnavailable
from gateway.x402 import reasons

log = logging.getLogger("gateway.chain")


class RpcError(Exception):
    """The node answered with a JSON-RPC error (e.g. execution reverted)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


def hex_int(value: Any) -> int:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ValueError(f"expected a hex quantity, got {type(value).__name__}")
    return int(value, 16)


class ChainRpc:
    """JSON-RPC to one chain through one or more endpoints (tried in order; a dead one is skipped)."""

    def __init__(self, name: str, chain_id: int, urls: Sequence[Secret], *, timeout: float = 10.0) -> None:
        if not urls:
            raise ValueError("at least one RPC URL is required")
        self.name = name
        self.chain_id = chain_id
        self._urls = tuple(urls)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        self._preferred = 0
        self._queue: list[tuple[str, list[Any], asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._flush_pending = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"ChainRpc({self.name!r}, chain_id={self.chain_id}, urls={list(self._urls)!r})"

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def verify_chain_id(self) -> None:
        """Every endpoint must serve the chain it is configured for (docs/threat-model.md T7: other-chain answers)."""
        for i, url in enumerate(self._urls):
            answer = await self._post(url, {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, i)
            got = hex_int(answer.get("result"))
            if got != self.chain_id:
                raise ChainUnavailable(
                    f"RPC endpoint {url!r} of network {self.name} serves chain {got}, not {self.chain_id}",
                    reason=reasons.CHAIN_ID_MISMATCH,
                )

    async def _post(self, url: Secret, body: Any, index: int) -> Any:
        if self._session is None:
            raise ChainUnavailable(f"network {self.name}: RPC client not started")
        try:
            async with self._session.post(url.reveal(), json=body, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise ChainUnavailable(f"network {self.name}: RPC endpoint {index} answered HTTP {resp.status}")
                return await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            # The exception text may contain the URL (and its key): log only the type.
            raise ChainUnavailable(
                f"network {self.name}: RPC endpoint {index} did not answer ({type(exc).__name__})"
            ) from None

    async def _send(self, body: Any) -> Any:
        last: ChainUnavailable | None = None
        n = len(self._urls)
        for step in range(n):
            index = (self._preferred + step) % n
            try:
                answer = await self._post(self._urls[index], body, index)
            except ChainUnavailable as exc:
                last = exc
                log.warning("rpc endpoint failed", extra={"network": self.name, "endpoint": index})
                continue
            self._preferred = index
            return answer
        assert last is not None
        raise last

    async def request(self, method: str, params: list[Any]) -> Any:
        (result,) = await self._call([(method, params)])
        if isinstance(result, RpcError):
            raise result
        return result

    async def batch(self, calls: Sequence[tuple[str, list[Any]]], *, alone: bool = False) -> list[Any]:
        """One HTTP round trip for several calls; each item is the result or an :class:`RpcError` instance.

        ``alone``: these calls, in this order, in an HTTP request of their own (not coalesced with others, never
        split): for transactions whose nonces must reach the node in sequence."""
        if not calls:
            return []
        if alone:
            return await self._alone(list(calls))
        return await self._call(calls)

    async def _alone(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        ids = [next(self._ids) for _ in calls]
        body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in zip(ids, calls, strict=True)]
        answer = await self._send(body)
        if not isinstance(answer, list):
            # Some endpoints refuse batches with a single error object: fall back to one call each, in order.
            answer = [await self._send(item) for item in body]
        by_id = {item.get("id"): item for item in answer if isinstance(item, dict)}
        out: list[Any] = []
        for i in ids:
            item = by_id.get(i)
            if item is None:
                raise ChainUnavailable(f"network {self.name}: RPC batch answer is missing an item")
            try:
                out.append(_result(item))
            except RpcError as exc:
                out.append(exc)
        return out

    # Coalescing. Every request()/batch() call joins a queue; at most ``max_in_flight`` HTTP requests per chain are
    # in flight, and whatever queued up meanwhile leaves as one JSON-RPC batch when one of them comes back. Idle,
    # a call leaves on the next loop iteration, alone, as a plain JSON-RPC object; under load, the preflights,
    # re-checks, broadcasts and receipt polls of many requests share round trips. Measured on the paid path (anvil,
    # 64 concurrent requests): fewer HTTP requests is less CPU for the gateway and for the node alike.
    max_in_flight = 4
    max_batch = 100  # calls per HTTP request (hosted RPCs cap batch sizes)

    async def _call(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for method, params in calls:
            fut: asyncio.Future[Any] = loop.create_future()
            self._queue.append((method, params, fut))
            futures.append(fut)
        if not self._flush_pending and self._in_flight < self.max_in_flight:
            self._flush_pending = True
            loop.call_soon(self._flush)
        return list(await asyncio.gather(*futures))

    def _flush(self) -> None:
        self._flush_pending = False
        while self._queue and self._in_flight < self.max_in_flight:
            take = [item for item in self._queue[: self.max_batch] if not item[2].done()]  # done: caller cancelled
            del self._queue[: self.max_batch]
            if take:
                self._in_flight += 1
                task = asyncio.ensure_future(self._post_calls(take))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _post_calls(self, items: list[tuple[str, list[Any], asyncio.Future[Any]]]) -> None:
        try:
            ids = [next(self._ids) for _ in items]
            bodies = [
                {"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p, _) in zip(ids, items, strict=True)
            ]
            positional = True  # answers in call order (a lone call's answer is its own, whatever its id)
            try:
                if len(bodies) == 1:
                    answers: Any = [await self._send(bodies[0])]
                else:
                    answers = await self._send(bodies)
                    positional = not isinstance(answers, list)
                    if positional:
                        # Some endpoints refuse batches with a single error object: fall back to one call each.
                        answers = [await _send_one(self, body) for body in bodies]
            except Exception as exc:
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            except BaseException:
                for _, _, fut in items:
                    fut.cancel()
                raise
            if positional:
                by_id: dict[Any, Any] = dict(zip(ids, answers, strict=True))
            else:
                by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
            for i, (_, _, fut) in zip(ids, items, strict=True):
                if fut.done():
                    continue
                answer = by_id.get(i)
                if answer is None:
                    fut.set_exception(ChainUnavailable(f"network {self.name}: RPC batch answer is missing an item"))
                    continue
                if isinstance(answer, ChainUnavailable):
                    fut.set_exception(answer)
                    continue
                try:
                    fut.set_result(_result(answer))
                except RpcError as err:
                    fut.set_result(err)
                except ChainUnavailable as err:
                    fut.set_exception(err)
        finally:
            self._in_flight -= 1
            if self._queue and not self._flush_pending:
                self._flush_pending = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def request_all(self, method: str, params: list[Any]) -> list[Any]:
        """The answers of every endpoint that answered; a majority must answer (quorum), else ChainUnavailable."""
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        answers = await asyncio.gather(
            *(self._post(url, body, i) for i, url in enumerate(self._urls)), return_exceptions=True
        )
        results: list[Any] = []
        for answer in answers:
            if isinstance(answer, ChainUnavailable):
                continue
            if isinstance(answer, BaseException):
                raise answer
            results.append(_result(answer))
        if len(results) < len(self._urls) // 2 + 1:
            raise ChainUnavailable(f"network {self.name}: too few RPC endpoints answered", reason=reasons.RPC_NO_QUORUM)
        return results

    async def request_agreed(self, method: str, params: list[Any], project: Callable[[Any], Any] = lambda x: x) -> Any:
        """Ask every endpoint; a majority must answer and every answer must agree (docs/threat-model.md T18: one lying
        or lagging RPC cannot make a payment count). With a single endpoint this is :meth:`request`."""
        if len(self._urls) == 1:
            return await self.request(method, params)
        results = await self.request_all(method, params)
        first = project(results[0])
        if any(project(r) != first for r in results[1:]):
            raise ChainUnavailable(f"network {self.name}: RPC endpoints disagree", reason=reasons.RPC_DISAGREEMENT)
        return results[0]

    async def eth_call(self, to: str, data: bytes, block: str = "latest") -> bytes:
        result = await self.request("eth_call", [{"to": to, "data": "0x" + data.hex()}, block])
        return bytes.fromhex(str(result)[2:])


async def _send_one(rpc: ChainRpc, body: Any) -> Any:
    """One call on its own: its answer object, or the ChainUnavailable it raised (that call's outcome alone)."""
    try:
        return await rpc._send(body)
    except ChainUnavailable as exc:
        return exc


def _result(answer: Any) -> Any:
    if not isinstance(answer, dict):
        raise ChainUnavailable("RPC answer is not a JSON object")
    if "error" in answer and answer["error"] is not None:
        err = answer["error"]
        if not isinstance(err, dict):
            raise RpcError(-1, str(err)[:200])
        return_code = err.get("code", -1)
        raise RpcError(
            return_code if isinstance(return_code, int) else -1, str(err.get("message", ""))[:500], err.get("data")
        )
    if "result" not in answer:
        raise ChainUnavailable("RPC answer has neither result nor error")
    return answer["result"]
