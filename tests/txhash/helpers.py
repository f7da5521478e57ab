"""Tx-hash proof kit: pay on chain like a real payer (its own ERC-20 ``transfer``), build the three headers,
and assert refusals (status, exact reason, upstream untouched)."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from dataclasses import dataclass
from typing import Any

import httpx
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from gateway.client.txhash import tx_proof_headers
from gateway.dev.chain import DevChain, send_transaction, set_eth_balance
from tests.support.concurrency import fire_together as storm
from tests.support.gateway import GatewayUnderTest
from tests.support.servers import read_body

PRICE = 100_000  # POST /paid and POST /paid-before: $0.10
TRANSFER_SELECTOR = keccak(text="transfer(address,uint256)")[:4]


def key_of(account: LocalAccount) -> str:
    return "0x" + bytes(account.key).hex()


def pay_to(gw: GatewayUnderTest) -> str:
    """The recipient the gateway really uses (``gw.pay_to`` is stale when a test overrides ``payment.pay_to``)."""
    return gw.config.payment.pay_to


def new_tx_payer(chain: DevChain, usdc: int = 10_000_000) -> LocalAccount:
    """A fresh account holding ``usdc`` atomic units and ETH for gas: a tx-hash payer sends its own transfer."""
    payer = chain.new_payer(usdc)
    set_eth_balance(chain.anvil, payer.address, 10**18)
    return payer


def erc20_transfer(
    chain: DevChain,
    payer: LocalAccount,
    to: str,
    amount: int,
    *,
    token: str | None = None,
    gas: int | None = None,
    check: bool = True,
) -> str:
    """``token.transfer(to, amount)`` sent by ``payer`` (the chain's USDC by default); returns the tx hash."""
    data = TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [to, amount])
    receipt = send_transaction(chain.anvil, key_of(payer), token or chain.usdc, data, gas=gas, check=check)
    return str(receipt["transactionHash"]).lower()


def pay(
    chain: DevChain, gw: GatewayUnderTest, amount: int = PRICE, *, to: str | None = None
) -> tuple[LocalAccount, str]:
    """A new payer sends ``amount`` USDC to the gateway's recipient; (payer, tx hash)."""
    payer = new_tx_payer(chain)
    return payer, erc20_transfer(chain, payer, to or pay_to(gw), amount)


def proof(
    gw: GatewayUnderTest,
    signer: LocalAccount,
    tx_hash: str,
    network: str = "base",
    method: str = "POST",
    path: str = "/paid",
) -> dict[str, str]:
    """The three headers presenting ``tx_hash``, the binding signed by ``signer`` for ``method gw.url+path``."""
    return tx_proof_headers(signer, tx_hash, network, method, gw.url + path)


def other_account() -> LocalAccount:
    acct: LocalAccount = Account.create()
    return acct


def b64json(value: str) -> Any:
    raw = value.encode("ascii")
    return json.loads(base64.b64decode(raw + b"=" * (-len(raw) % 4)))


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body, dict), response.text
    reason = body.get("error")
    assert isinstance(reason, str) and reason, response.text
    return reason


def assert_refused(
    response: httpx.Response, gw: GatewayUnderTest, reason: str, *, status: int = 402, upstream_calls: int = 0
) -> None:
    """A refusal with its exact reason, and the upstream saw no (further) request. A 402 still offers payment:
    the v1 body and the v2 header both name the reason and carry the tx-hash options."""
    assert response.status_code == status, (response.status_code, response.text)
    assert error_of(response) == reason, response.text
    if status == 402:
        body = response.json()
        assert body["accepts"] and body["payment"], response.text
        v2 = b64json(response.headers["payment-required"])
        assert v2["error"] == reason
        assert v2["extensions"]["txhash"]["options"]
    assert len(gw.upstream.requests) == upstream_calls, gw.upstream.requests


def assert_served(response: httpx.Response, tx_hash: str, *, network: str = "base") -> dict[str, Any]:
    """A 2xx carrying the v1 receipt header for ``tx_hash``; returns the decoded receipt."""
    assert 200 <= response.status_code < 300, (response.status_code, response.text)
    value = response.headers.get("x-payment-response")
    assert value, f"no X-PAYMENT-RESPONSE in {dict(response.headers)}"
    receipt: dict[str, Any] = b64json(value)
    assert receipt["success"] is True
    assert receipt["transaction"].lower() == tx_hash.lower()
    assert receipt["network"] == network
    return receipt


@dataclass
class Storm:
    """The outcome of ``n`` identical requests released together."""

    responses: list[httpx.Response]

    @property
    def served(self) -> list[httpx.Response]:
        return [r for r in self.responses if 200 <= r.status_code < 300]

    @property
    def refused(self) -> list[httpx.Response]:
        return [r for r in self.responses if not 200 <= r.status_code < 300]


def fire_together(url: str | list[str], method: str, path: str, headers: dict[str, str], n: int) -> Storm:
    """:func:`tests.support.concurrency.fire_together`, counted as a :class:`Storm`."""
    return Storm(storm(url, method, path, headers, n))


class HeadLiar:
    """An ASGI JSON-RPC endpoint forwarding to ``target`` faithfully, except that it reports the chain head
    ``ahead`` blocks further than it is (single calls and batches): a lying or broken RPC that would make a
    fresh transfer look deeply confirmed."""

    def __init__(self, target: str, ahead: int) -> None:
        self.target = target
        self.ahead = ahead

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        doc = json.loads(body)
        answer = json.loads(await asyncio.to_thread(self._forward, body))
        calls = doc if isinstance(doc, list) else [doc]
        items = answer if isinstance(answer, list) else [answer]
        lying = {c.get("id") for c in calls if c.get("method") == "eth_blockNumber"}
        for item in items:
            if item.get("id") in lying and isinstance(item.get("result"), str):
                item["result"] = hex(int(item["result"], 16) + self.ahead)
        out = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    def _forward(self, body: bytes) -> bytes:
        req = urllib.request.Request(self.target, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())
