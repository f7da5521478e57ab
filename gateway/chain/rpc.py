"""Async JSON-RPC access to one EVM network, over the gateway's pooled aiohttp session.

Why not ``web3.AsyncWeb3``: the gateway needs a handful of calls on the hot path, batched into one HTTP round
trip (nonce state + balance + simulation), with failover between several endpoints and errors that never echo
an RPC URL (those embed API keys). Encoding comes from ``eth_abi`` (web3's codec) via :mod:`gateway.abi`.
Raw JSON-RPC also reads Polygon's proof-of-authority blocks as they are, so no POA middleware is needed.

A JSON-RPC *error answer* (a revert, "nonce too low") is a real answer and raises :class:`RpcError`; no
answer at all raises :class:`~gateway.errors.ChainUnavailable` (503, fail closed).

Several endpoints (docs/threat-model.md T18, T42): one that is down or slow must cost neither the start nor every
call.

* At start every endpoint is asked its chain id, all at once; the gateway starts with those serving the configured
  chain and fails only when none does. One serving another chain is never used (T7), one that did not answer is
  used once it answers with the right chain id (checked by a probe, or before use when no other is left).
* Each endpoint keeps a health score: the moving averages (EWMA) of its answer time and of its failures. Calls go
  to the best one (kept while it stays within a margin of the others, so consecutive calls see one node's view);
  a failure fails over at once and cools the endpoint off (1 s, doubling to 30 s).
* A read the best endpoint has not answered within ``hedge_after`` (or three times its usual answer time) is
  also sent to the next one, and the first answer wins; the slow one's score shows it, so it is demoted. Writes
  (``eth_sendRawTransaction``) and nonce reads are never hedged. Endpoints not in use are probed every
  ``probe_interval`` seconds while there is traffic, so a recovered endpoint can win its place back.
* Tx-hash proofs (:meth:`ChainRpc.request_all`, :meth:`ChainRpc.request_agreed`) still need a majority of all
  configured endpoints to answer and every answer to agree, and their callers take the lowest head; once a
  majority answered, a straggler is waited for only as long again (it cannot change what a majority that includes
  an honest endpoint already decides).

Scores, ranking and hedging live in :mod:`gateway.chain.endpoints`. This module stays over ~400 lines because
sending, coalescing, chain-id checks and quorum reads share one endpoint list, id counter and call queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from gateway.chain.endpoints import Endpoint, hedgeable, hedged, ranked
from gateway.config import Secret
from gateway.errors import ChainUnavailable
from gateway.tasks import stop_all
from gateway.x402 import reasons
from gateway.x402.codec import loads

log = logging.getLogger("gateway.chain")

_QUORUM_GRACE = 0.25  # seconds at least a straggler is waited for once a majority answered


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
    """JSON-RPC to one chain through one or more endpoints (health-scored, hedged; see the module docstring)."""

    def __init__(
        self,
        name: str,
        chain_id: int,
        urls: Sequence[Secret],
        *,
        timeout: float = 10.0,
        hedge_after: float = 0.5,
        probe_interval: float = 15.0,
    ) -> None:
        if not urls:
            raise ValueError("at least one RPC URL is required")
        self.name = name
        self.chain_id = chain_id
        self._urls = tuple(urls)
        self._endpoints = [Endpoint(i, url) for i, url in enumerate(self._urls)]
        self._timeout_seconds = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._hedge_after = hedge_after  # 0: never hedge
        self._probe_interval = probe_interval  # 0: never probe
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        self._preferred = 0
        self._verifying: asyncio.Future[None] | None = None
        self._queue: list[tuple[str, list[Any], asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._flush_pending = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._probes: set[asyncio.Task[None]] = set()
        self._receipt_sinks: list[Callable[[str, dict[str, Any]], None]] = []

    def __repr__(self) -> str:
        return f"ChainRpc({self.name!r}, chain_id={self.chain_id}, urls={list(self._urls)!r})"

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def aclose(self) -> None:
        """Stop the probes in flight (calls in flight belong to their callers)."""
        probes, self._probes = self._probes, set()
        await stop_all(probes)

    # -- endpoints ------------------------------------------------------------------------------------------------

    async def verify_chain_id(self) -> None:
        """Ask every endpoint its chain id at once; fail only when none serves the configured chain (T7, T42).
        Once one does, the others get as long again (at least a second): one that hangs must not hold the start
        for the whole RPC timeout (it is checked again before it is used)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        pending = {asyncio.ensure_future(self._verify(ep)) for ep in self._endpoints}
        grace_end: float | None = None
        try:
            while pending:
                timeout = None if grace_end is None else max(0.0, grace_end - loop.time())
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                if grace_end is None and any(task.result() for task in done):
                    grace_end = loop.time() + max(1.0, loop.time() - started)
        finally:
            await stop_all(pending)
        if any(ep.state == "ok" for ep in self._endpoints):
            for ep in self._endpoints:
                if ep.state == "unverified":
                    log.warning(
                        "rpc endpoint did not answer at start; it is used once it answers with the right chain id",
                        extra={"network": self.name, "endpoint": ep.index},
                    )
            return
        wrong = [ep for ep in self._endpoints if ep.state == "wrong_chain"]
        if wrong:
            raise ChainUnavailable(
                f"RPC endpoint {wrong[0].url!r} of network {self.name} serves chain {wrong[0].chain_seen}, "
                f"not {self.chain_id}",
                reason=reasons.CHAIN_ID_MISMATCH,
            )
        raise ChainUnavailable(f"network {self.name}: no RPC endpoint answered")

    def endpoint_states(self) -> list[str]:
        """``ok``, ``cooling``, ``unverified`` or ``wrong_chain`` per endpoint, in configuration order."""
        now = asyncio.get_running_loop().time()
        return ["cooling" if ep.state == "ok" and ep.cool_until > now else ep.state for ep in self._endpoints]

    async def _verify(self, ep: Endpoint) -> bool:
        """Whether ``ep`` answers with the configured chain id; one serving another chain is never used again."""
        ep.probing = True
        try:
            body = {"jsonrpc": "2.0", "id": next(self._ids), "method": "eth_chainId", "params": []}
            try:
                answer = await self._timed(ep, body)
                got = hex_int(answer.get("result") if isinstance(answer, dict) else None)
            except ChainUnavailable:
                return False
            except ValueError:
                ep.failed()
                return False
        finally:
            ep.probing = False
        ep.chain_seen = got
        if got != self.chain_id:
            if ep.state != "wrong_chain":
                log.error(
                    "rpc endpoint serves another chain; it is not used",
                    extra={"network": self.name, "endpoint": ep.index, "chain_id": got},
                )
            ep.state = "wrong_chain"
            return False
        ep.state = "ok"
        return True

    def _ranked(self) -> list[Endpoint]:
        return ranked(self._endpoints, self._preferred)

    async def _usable(self) -> list[Endpoint]:
        order = self._ranked()
        if not order:  # none verified (yet): check the others' chain ids first, once for every waiting caller
            if self._verifying is None or self._verifying.done():
                self._verifying = asyncio.ensure_future(self._verify_unverified())
            await asyncio.shield(self._verifying)
            order = self._ranked()
            if not order:
                raise ChainUnavailable(f"network {self.name}: no RPC endpoint serving chain {self.chain_id} answered")
        self._maybe_probe(order[0])
        return order

    async def _verify_unverified(self) -> None:
        await asyncio.gather(*(self._verify(ep) for ep in self._endpoints if ep.state == "unverified"))

    def _maybe_probe(self, in_use: Endpoint) -> None:
        """Re-measure endpoints that calls do not reach (and check their chain id): a recovered or faster one can
        take over. Only while calls are made, at most once per ``probe_interval`` per endpoint."""
        if self._probe_interval <= 0 or len(self._endpoints) < 2:
            return
        now = asyncio.get_running_loop().time()
        for ep in self._endpoints:
            if ep is in_use or ep.probing or ep.state == "wrong_chain":
                continue
            if now - ep.last_seen >= self._probe_interval:
                ep.probing = True
                task = asyncio.ensure_future(self._probe(ep))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _probe(self, ep: Endpoint) -> None:
        try:
            await self._verify(ep)
        except Exception:  # a session closing under it at shutdown: nothing to learn
            ep.probing = False

    async def _timed(self, ep: Endpoint, body: Any) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            answer = await self._post(ep.url, body, ep.index)
        except ChainUnavailable:
            ep.failed()
            raise
        ep.answered(loop.time() - started)
        return answer

    # -- sending ------------------------------------------------------------------------------------------------

    async def _post(self, url: Secret, body: Any, index: int) -> Any:
        if self._session is None:
            raise ChainUnavailable(f"network {self.name}: RPC client not started")
        try:
            async with self._session.post(url.reveal(), json=body, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise ChainUnavailable(f"network {self.name}: RPC endpoint {index} answered HTTP {resp.status}")
                return await resp.json(content_type=None, loads=loads)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            # The exception text may contain the URL (and its key): log only the type.
            raise ChainUnavailable(
                f"network {self.name}: RPC endpoint {index} did not answer ({type(exc).__name__})"
            ) from None

    async def _send(self, body: Any) -> Any:
        """``body`` to the best endpoint, failing over at once; a read is hedged (see the module docstring)."""
        order = await self._usable()
        if self._hedge_after > 0 and len(order) > 1 and hedgeable(body):
            return await self._hedged(order, body)
        last: ChainUnavailable | None = None
        for ep in order:
            try:
                answer = await self._timed(ep, body)
            except ChainUnavailable as exc:
                last = exc
                log.warning("rpc endpoint failed", extra={"network": self.name, "endpoint": ep.index})
                continue
            self._use(ep)
            return answer
        assert last is not None
        raise last

    async def _hedged(self, order: list[Endpoint], body: Any) -> Any:
        ep, answer = await hedged(
            order,
            lambda ep: self._timed(ep, body),
            hedge_after=self._hedge_after,
            timeout=self._timeout_seconds,
            network=self.name,
        )
        self._use(ep)
        return answer

    def _use(self, ep: Endpoint) -> None:
        if ep.index != self._preferred:
            log.info("rpc endpoint in use", extra={"network": self.name, "endpoint": ep.index})
            self._preferred = ep.index

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
        """The answers of the endpoints that answered; a majority of all configured endpoints must answer (quorum),
        else ChainUnavailable. Once a majority answered, the others are waited for only as long again (at least
        ``_QUORUM_GRACE``): a majority with an honest endpoint in it already bounds the lowest head and catches a
        lie, and a slow endpoint must not hold every proof."""
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        need = len(self._endpoints) // 2 + 1
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def ask(ep: Endpoint) -> Any:
            if ep.state != "ok" and not await self._verify(ep):  # never an answer from an unchecked chain
                raise ChainUnavailable(f"network {self.name}: RPC endpoint {ep.index} is not in use")
            return await self._timed(ep, body)

        pending = {asyncio.ensure_future(ask(ep)) for ep in self._endpoints if ep.state != "wrong_chain"}
        results: list[Any] = []
        grace_end: float | None = None
        try:
            while pending and len(results) + len(pending) >= need:
                timeout = None if grace_end is None else max(0.0, grace_end - loop.time())
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break  # the stragglers had their grace
                failure: BaseException | None = None
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        try:
                            results.append(_result(task.result()))
                        except (RpcError, ChainUnavailable) as err:
                            failure = failure or err
                    elif not isinstance(exc, ChainUnavailable):
                        failure = failure or exc
                if failure is not None:
                    raise failure
                if grace_end is None and len(results) >= need:
                    grace_end = loop.time() + max(_QUORUM_GRACE, loop.time() - started)
        finally:
            for task in pending:
                task.cancel()
        if len(results) < need:
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

    # -- receipts learned while sending ----------------------------------------------------------------------

    def on_receipt(self, sink: Callable[[str, dict[str, Any]], None]) -> None:
        """``sink(tx_hash, receipt)`` is called for every receipt a synchronous broadcast answered with."""
        self._receipt_sinks.append(sink)

    def saw_receipt(self, tx_hash: str, receipt: dict[str, Any]) -> None:
        for sink in self._receipt_sinks:
            sink(tx_hash, receipt)

    async def send_raw_sync(self, raw: str) -> Any:
        """``eth_sendRawTransactionSync`` (EIP-7966) to the endpoint in use: the node answers once the transaction
        is included, with its receipt (a dict), or with an error (an :class:`RpcError`, returned, not raised).
        ``None`` when that endpoint does not offer the method: nothing was sent, use ``eth_sendRawTransaction``.

        Whether an endpoint offers it is asked once, with a probe that cannot send anything (an empty
        transaction). The call's duration is the chain's, not the endpoint's: it is kept out of the health score.
        """
        ep = (await self._usable())[0]
        if ep.sync_send is None:
            await self._probe_sync(ep)
        if not ep.sync_send:
            return None
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": "eth_sendRawTransactionSync", "params": [raw]}
        try:
            return _result(await self._post(ep.url, body, ep.index))
        except RpcError as exc:
            if exc.code == -32601:  # no such method, so nothing was sent: never ask this endpoint again
                ep.sync_send = False
                return None
            return exc

    async def _probe_sync(self, ep: Endpoint) -> None:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": "eth_sendRawTransactionSync", "params": ["0x"]}
        try:
            answer = await self._post(ep.url, body, ep.index)
        except ChainUnavailable:  # an HTTP error for an unknown method, or no answer: a few tries, then never
            ep.sync_probes += 1
            if ep.sync_probes >= 3:
                ep.sync_send = False
            return
        try:
            _result(answer)
        except RpcError as exc:
            ep.sync_send = not _not_offered(exc)  # any other refusal is about the (empty) transaction
            if ep.sync_send:
                log.info(
                    "rpc endpoint offers eth_sendRawTransactionSync", extra={"network": self.name, "endpoint": ep.index}
                )
            return
        except ChainUnavailable:
            pass
        ep.sync_send = False  # no error for an empty transaction: not an answer to rely on

    async def eth_call(self, to: str, data: bytes, block: str = "latest") -> bytes:
        result = await self.request("eth_call", [{"to": to, "data": "0x" + data.hex()}, block])
        return bytes.fromhex(str(result)[2:])


async def _send_one(rpc: ChainRpc, body: Any) -> Any:
    """One call on its own: its answer object, or the ChainUnavailable it raised (that call's outcome alone)."""
    try:
        return await rpc._send(body)
    except ChainUnavailable as exc:
        return exc


_NOT_OFFERED = (
    "not found",
    "not exist",
    "not supported",
    "unsupported",
    "not available",
    "not allowed",
    "unknown method",
)


def _not_offered(exc: RpcError) -> bool:
    """The endpoint does not offer the method (rather than refusing its arguments)."""
    text = exc.message.lower()
    return exc.code == -32601 or any(marker in text for marker in _NOT_OFFERED)


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
