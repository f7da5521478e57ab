"""Interoperability: the official ``x402`` PyPI client (2.x) pays the gateway, in v2 and forced onto v1."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner

from gateway.dev.chain import DevChain
from gateway.x402.codec import decode_header
from tests.support.gateway import running_gateway, sqlite_url


def official_client(payer: LocalAccount) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(payer))
    return client


def strip_v2_challenge(app: Any) -> Any:
    """A v1-only server: the 402 keeps its JSON body but loses the PAYMENT-REQUIRED header."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def send2(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 402:
                message = {**message, "headers": [(k, v) for k, v in message["headers"] if k != b"payment-required"]}
            await send(message)

        await app(scope, receive, send2)

    return wrapped


async def pay_with_official_client(url: str, payer: LocalAccount) -> Any:
    async with x402HttpxClient(official_client(payer), timeout=30) as http:
        return await http.post(url, json={"prompt": "hello"})


@pytest.mark.parametrize("version", [2, 1])
def test_official_client_pays_once_and_gets_receipt(base_chain: DevChain, tmp_path: Any, version: int) -> None:
    payer = base_chain.new_payer(1_000_000)
    wrap = strip_v2_challenge if version == 1 else None
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), wrap=wrap) as gw:
        before = (gw.balance(payer.address), gw.balance(gw.pay_to))
        response = asyncio.run(pay_with_official_client(gw.url + "/paid", payer))
        assert response.status_code == 200, response.text
        assert len(gw.upstream.requests) == 1
        header = "payment-response" if version == 2 else "x-payment-response"
        receipt = decode_header(response.headers[header])
        assert receipt["success"] is True
        assert receipt["network"] == ("eip155:8453" if version == 2 else "base")
        assert receipt["payer"].lower() == payer.address.lower()
        mined = base_chain.rpc("eth_getTransactionReceipt", [receipt["transaction"]])
        assert int(mined["status"], 16) == 1
        after = (gw.balance(payer.address), gw.balance(gw.pay_to))
        assert after == (before[0] - 100_000, before[1] + 100_000)
