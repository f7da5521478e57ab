"""The paying half of the client: an httpx client that answers a 402 by itself, within spend controls.

Paying a 402, in order:

1. read the options: the v2 ``PAYMENT-REQUIRED`` header if present (else the v1 body's ``accepts``), and the
   tx-hash options (v2 ``extensions.txhash.options`` / v1 ``payment``);
2. keep those :class:`SpendControls` allow (network, asset, ``max_per_payment``) in the server's order, per
   ``pay_with``; none left: :class:`PaymentRefused`, nothing signed;
3. reserve the amount in the budget, then pay: sign the EIP-3009 authorization (``PAYMENT-SIGNATURE`` for a v2
   402, ``X-PAYMENT`` for v1), or send the USDC transfer, wait for its confirmations and sign the binding;
4. resend the request with the payment **and the same ``Idempotency-Key`` and body bytes**. Transient failures
   are retried with that same payment, never a new one: the gateway replays its stored answer, or (the first
   attempt failed upstream) the unconsumed / paid-but-unserved payment serves the retry. One logical call pays
   at most once. A 402 to the paid request is :class:`PaymentFailed` (``transaction_not_final`` for a transfer
   is waited out first).

The budget counts every payment presented, also one the server refused: an authorization it holds can be settled
until its ``validBefore`` whatever it answered, and only the server's word says it was not. A transfer counts from
the moment its broadcast starts, whatever happens next (a broadcast with no answer may still be mined): it is given
back only when the transfer is known not to have left, before the broadcast (refused by the estimate, the node
refused it) or after a failed one, when the node knows no transaction with its hash and the wallet's nonce is unused
(``transfer_not_sent``).

``pay_with="session"`` pays a ``batch-settlement`` offer through a channel (:mod:`gateway.client._sessions`: a
deposit once, then a voucher per request) and any other 402 as ``exact``. A URL whose 402 offered a session is
paid at once on the next call (the voucher goes with the first attempt), without asking for the 402 again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Self

import httpx
from eth_account.signers.local import LocalAccount

from gateway.client._channels import MemorySessionStore, SessionChannel, SessionStore
from gateway.client._config import RetryPolicy, SessionSettings, TxHashPayments
from gateway.client._errors import ApiError, PaymentFailed, PaymentRefused, TransientError
from gateway.client._models import payment_receipt
from gateway.client._sessions import SessionCall, SessionPayer, SessionRefund, origin_of
from gateway.client._spend import Budget, SpendControls, atomic_amount
from gateway.client._transfer import TransferSender, TxOption
from gateway.client.exact import Option, sign_exact_payment
from gateway.client.session import SessionOffer, session_offers
from gateway.client.txhash import tx_proof_headers
from gateway.x402 import reasons
from gateway.x402.codec import decode_header, loads

__all__ = ["PayWith", "PayingClient", "error_of", "json_doc"]

PayWith = Literal["exact", "txhash", "auto", "session"]

_IN_FLIGHT = frozenset({reasons.IDEMPOTENCY_KEY_IN_FLIGHT, reasons.PAYMENT_IN_FLIGHT})
_NETWORK_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_USER_AGENT = "x402-gateway-client/0.1"
_KNOWN_SESSION_URLS = 1024  # (method, URL) -> the session offer its last 402 made: paid at once next time


@dataclass(frozen=True, slots=True)
class _Offer:
    kind: Literal["exact", "txhash", "session"]
    network: str
    asset: str
    amount: int
    exact: Option | None = None
    tx: TxOption | None = None
    session: SessionOffer | None = None


def json_doc(response: httpx.Response) -> dict[str, Any] | None:
    try:
        doc = loads(response.content)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def error_of(response: httpx.Response) -> tuple[str | None, str]:
    """(machine-readable reason, human message) of an error answer: the body's ``error`` / ``message``, else the
    v2 challenge's ``error``, else the receipt's ``errorReason``."""
    doc = json_doc(response) or {}
    reason = doc.get("error") if isinstance(doc.get("error"), str) else None
    if reason is None and response.headers.get("payment-required"):
        try:
            challenge = decode_header(response.headers["payment-required"])
            reason = challenge.get("error") if isinstance(challenge, dict) else None
        except ValueError:
            pass
    if reason is None:
        receipt = payment_receipt(response.headers)
        raw = receipt.raw.get("errorReason") if receipt else None
        reason = raw if isinstance(raw, str) else None
    message = doc.get("message") if isinstance(doc.get("message"), str) else None
    return reason, message or reason or f"HTTP {response.status_code} {response.reason_phrase}".strip()


class PayingClient:
    """``request()`` that pays 402s; the base of :class:`~gateway.client.AsyncX402Client` (arguments there)."""

    def __init__(
        self,
        base_url: str = "",
        *,
        account: LocalAccount | None = None,
        spend: SpendControls | None = None,
        pay_with: PayWith = "exact",
        tx_hash: TxHashPayments | None = None,
        retry: RetryPolicy | None = None,
        sessions: SessionSettings | None = None,
        session_store: SessionStore | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if pay_with not in ("exact", "txhash", "auto", "session"):
            raise ValueError("pay_with must be 'exact', 'txhash', 'auto' or 'session'")
        if pay_with == "txhash" and (tx_hash is None or not tx_hash.rpc_urls):
            raise ValueError("pay_with='txhash' needs tx_hash=TxHashPayments(rpc_urls={...})")
        self.base_url = base_url.rstrip("/")
        self.account = account
        self.spend = spend or SpendControls()
        self.pay_with: PayWith = pay_with
        self.tx_hash = tx_hash
        self.retry = retry or RetryPolicy()
        self._budget = Budget(self.spend.budget)
        self._sender = TransferSender(account, tx_hash) if account is not None and tx_hash is not None else None
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers={"User-Agent": _USER_AGENT, **(headers or {})},
            transport=transport,
        )
        self.session_store: SessionStore = session_store if session_store is not None else MemorySessionStore()
        self._sessions = (
            SessionPayer(
                account,
                sessions or SessionSettings(),
                self.session_store,
                self.spend,
                self._budget,
                self._send,
                error_of,
            )
            if account is not None
            else None
        )
        self._session_urls: dict[tuple[str, str], tuple[SessionOffer, str]] = {}

    def __repr__(self) -> str:
        wallet = self.account.address if self.account else None
        return f"{type(self).__name__}(base_url={self.base_url!r}, account={wallet}, spend={self.spend!r})"

    # ---------------------------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._sender is not None:
            await self._sender.aclose()
        if self._sessions is not None:
            await self._sessions.aclose()

    @property
    def spent(self) -> int:
        """Atomic units this client has paid (or committed to) so far."""
        return self._budget.spent

    @property
    def remaining_budget(self) -> int | None:
        return self._budget.remaining

    # ---------------------------------------------------------------------------------------------- sessions

    def _session_payer(self) -> SessionPayer:
        if self._sessions is None:
            raise PaymentRefused("sessions need a wallet: this client has none", reason="no_wallet")
        return self._sessions

    async def open_session(
        self,
        url: str,
        *,
        deposit: int | Decimal | str | None = None,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
    ) -> SessionChannel:
        """Make sure a channel pays ``url``: ask for its 402 (unpaid), and unless this client already holds a
        channel for that offer with room for a request, pay one request at ``url`` carrying a deposit
        (``deposit``, else ``SessionSettings.deposit``, else the offer's ``minDeposit``; an existing channel is
        topped up when ``deposit`` is given). Returns the channel. Works whatever ``pay_with`` is."""
        payer = self._session_payer()
        amount = atomic_amount(deposit, "deposit")
        sent = {"Idempotency-Key": str(uuid.uuid4()), **(headers or {})}
        offer, origin, _ = await payer.probe(method.upper(), url, sent)
        channel = payer.find(offer, origin)
        if channel is not None and amount is None and channel.remaining >= offer.amount:
            return channel
        response, offer = await payer.pay(
            offer, origin, method.upper(), url, content=None, params=None, headers=sent, top_up=amount
        )
        if response.status_code >= 400:
            reason, message = error_of(response)
            raise ApiError(
                f"the request that opened the channel failed: {message}", status=response.status_code, reason=reason
            )
        opened = payer.find(offer, origin)
        assert opened is not None  # written before anything was sent
        return opened

    async def refund_session(
        self,
        url: str,
        *,
        amount: int | Decimal | str | None = None,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
    ) -> SessionRefund:
        """Ask the server behind ``url`` to return what this client's channel there holds beyond what it charged
        (or ``amount`` of it: an int of atomic units or a Decimal/str of dollars). The channel stays open: the
        next paid request deposits again."""
        payer = self._session_payer()
        atomic = atomic_amount(amount, "amount")
        sent = {"Idempotency-Key": str(uuid.uuid4()), **(headers or {})}
        offer, origin, _ = await payer.probe(method.upper(), url, sent)
        return await payer.refund(offer, origin, method.upper(), url, amount=atomic, headers=sent)

    def session_channels(self, url: str | None = None) -> list[SessionChannel]:
        """The channels in this client's session store (all wallets), those with ``url``'s server if given,
        newest first."""
        channels = self.session_store.channels()
        if url is not None:
            origin = origin_of(self._http.build_request("GET", url).url)
            channels = [c for c in channels if c.origin == origin]
        return sorted(channels, key=lambda c: c.opened_at, reverse=True)

    # ------------------------------------------------------------------------------------------ HTTP + 402

    async def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        """Send a request, paying a 402 if one comes. Returns the final answer whatever its status (like httpx);
        raises :class:`PaymentRefused`, :class:`PaymentFailed`, or :class:`TransientError` for network errors
        that outlasted the retries. Every call carries an ``Idempotency-Key`` (``idempotency_key`` or a fresh
        uuid4), the same on every attempt of this call."""
        method = method.upper()
        sent: dict[str, str] = dict(headers or {})
        if json is not None:
            content = _dumps(json)
            sent.setdefault("Content-Type", "application/json")
        # Also on GET: a paid GET retried after a lost answer must be replayed, not refused as a reused payment.
        sent.setdefault("Idempotency-Key", idempotency_key or str(uuid.uuid4()))
        known = self._session_urls.get((method, url)) if self.pay_with == "session" else None
        call = SessionCall()  # one call: a preemptive voucher refused, then the 402 paid afresh, buy one request
        if known is not None and self._sessions is not None:
            offer, origin = known
            first, offer = await self._sessions.pay(
                offer, origin, method, url, content=content, params=params, headers=sent, preemptive=True, call=call
            )
            if first.status_code != 402:
                self._session_urls[(method, url)] = (offer, origin)
                return first
            self._session_urls.pop((method, url), None)  # no session matter: pay this 402 afresh
        else:
            first, _ = await self._send(method, url, content=content, params=params, headers=sent)
            if first.status_code != 402:
                return first
        return await self._pay(first, method, url, content=content, params=params, headers=sent, call=call)

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)

    def _retryable(self, response: httpx.Response) -> bool:
        if response.status_code in self.retry.statuses:
            return True
        return response.status_code == 409 and error_of(response)[0] in _IN_FLIGHT

    async def _send(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[httpx.Response, bool]:
        """One logical request with the retry policy: (final response, whether some attempt's fate is unknown)."""
        uncertain = False
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, url, content=content, params=params, headers=headers)
            except _NETWORK_ERRORS as exc:
                uncertain = True
                delay = self.retry.delay(attempt)
                if delay is None:
                    raise TransientError(
                        f"{method} {url}: {type(exc).__name__} after {attempt + 1} attempt(s)", reason="network_error"
                    ) from exc
            else:
                if not self._retryable(response):
                    return response, uncertain
                delay = self.retry.delay(attempt, response.headers.get("retry-after"))
                if delay is None:
                    return response, uncertain
            await asyncio.sleep(delay)
            attempt += 1

    def _offers(self, response: httpx.Response) -> list[_Offer]:
        v2: dict[str, Any] | None = None
        if response.headers.get("payment-required"):
            try:
                doc = decode_header(response.headers["payment-required"])
                v2 = doc if isinstance(doc, dict) else None
            except ValueError:
                v2 = None
        body = json_doc(response) or {}
        if v2 is not None:
            exact = [Option(2, r, v2.get("resource")) for r in v2.get("accepts") or [] if isinstance(r, dict)]
            ext: Any = v2.get("extensions")
            txhash: Any = ext.get("txhash") if isinstance(ext, dict) else None
            raw_tx = (txhash.get("options") if isinstance(txhash, dict) else None) or []
        else:
            exact = [Option(1, r, None) for r in body.get("accepts") or [] if isinstance(r, dict)]
            raw_tx = body.get("payment") or []
        offers: list[_Offer] = []
        if self.pay_with == "session" and self._sessions is not None:
            for session in session_offers(v2):
                offers.append(_Offer("session", session.network, session.asset, session.amount, session=session))
        if self.pay_with in ("exact", "auto", "session"):
            for option in exact:
                req = option.requirement
                try:
                    if req.get("scheme") == "exact":
                        offers.append(_Offer("exact", str(req["network"]), str(req["asset"]), option.amount, option))
                except (KeyError, TypeError, ValueError):
                    continue
        if self.pay_with in ("txhash", "auto") and self._sender is not None:
            for raw in raw_tx if isinstance(raw_tx, list) else []:
                tx = TxOption.parse(raw)
                if tx is not None and self._sender.rpc_url(tx) is not None:
                    # Judged by the chain the transfer goes to (its chainId), not by the name the 402 gives it: a
                    # network named "base" with the chainId of another chain, or a name this client does not know
                    # (any asset allowed) on a chain it does, must not send money the spend controls refuse.
                    chain = f"eip155:{tx.chain_id}"
                    offers.append(_Offer("txhash", chain, tx.asset, tx.amount, tx=tx))
        return offers

    def _choose(self, response: httpx.Response) -> _Offer:
        if self.account is None:
            raise PaymentRefused("the server asks for payment and this client has no wallet", reason="no_wallet")
        offers = self._offers(response)
        refusals: list[PaymentRefused] = []
        for offer in offers:
            refusal = self.spend.refusal(amount=offer.amount, network=offer.network, asset=offer.asset)
            if refusal is None:
                return offer
            refusals.append(refusal)
        if refusals:
            first = refusals[0]
            first.status = 402
            raise first
        raise PaymentRefused(
            f"the 402 offers no option this client can pay with (pay_with={self.pay_with!r})",
            status=402,
            reason="no_payable_option",
        )

    async def _pay(
        self,
        challenge: httpx.Response,
        method: str,
        url: str,
        *,
        content: bytes | None,
        params: Mapping[str, str | int] | None,
        headers: dict[str, str],
        call: SessionCall,
    ) -> httpx.Response:
        offer = self._choose(challenge)
        assert self.account is not None
        if offer.session is not None and self._sessions is not None:
            origin = origin_of(challenge.request.url)
            response, session = await self._sessions.pay(
                offer.session, origin, method, url, content=content, params=params, headers=headers, call=call
            )
            self._session_urls[(method, url)] = (session, origin)
            while len(self._session_urls) > _KNOWN_SESSION_URLS:
                del self._session_urls[next(iter(self._session_urls))]
            return response
        self._budget.reserve(offer.amount)
        refundable = True  # until money may have moved
        tx_hash: str | None = None
        deadline = 0.0

        def broadcasting() -> None:
            nonlocal refundable
            refundable = False  # the transfer leaves now: it may be mined whatever happens next

        try:
            if offer.exact is not None:
                name, value = sign_exact_payment(self.account, offer.exact)
                proof = {name: value}
            else:
                assert offer.tx is not None and self._sender is not None and self.tx_hash is not None
                deadline = time.monotonic() + self.tx_hash.timeout
                tx_hash = await self._sender.send(offer.tx, broadcasting=broadcasting)
                await self._sender.wait_final(offer.tx, tx_hash, deadline=deadline)
                resource = offer.tx.resource or str(challenge.request.url)
                proof = tx_proof_headers(self.account, tx_hash, offer.tx.network, method, resource)
        except BaseException as exc:
            # PaymentRefused: nothing left, by that error's contract (a transfer never broadcast, or one the node
            # showed was never sent); anything else once broadcasting began may have moved the money.
            if refundable or isinstance(exc, PaymentRefused):
                self._budget.refund(offer.amount)
            raise
        paid_headers = {**headers, **proof}
        while True:
            response, _ = await self._send(method, url, content=content, params=params, headers=paid_headers)
            if response.status_code != 402:
                return response
            reason, message = error_of(response)
            waiting = self.tx_hash.poll_interval if self.tx_hash is not None else 0.0
            if tx_hash is not None and reason == reasons.TX_NOT_FINAL and time.monotonic() + waiting < deadline:
                # The gateway wants more confirmations than we waited for: present the same proof again later.
                await asyncio.sleep(waiting)
                continue
            # No refund, whatever the 402 says: the server holds the signed authorization and can settle it until
            # its validBefore (a server may settle it and answer 402); only its own word says it did not.
            raise PaymentFailed(
                f"the server refused the payment: {message}", status=402, reason=reason, tx_hash=tx_hash
            )


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
