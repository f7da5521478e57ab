"""A payer whose client lost its channel records (a new official client, fresh storage, same wallet) is not stuck:
its first voucher is built from the chain (``totalClaimed``, below what we charged), the gateway answers with the
corrective 402 (our channel state and the payer's own last voucher), the client checks that voucher against its
key and the chain, and pays on from our cumulative. Nothing is served for the stale voucher, nothing is charged
twice, and the receiver ends with exactly the sum charged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.http.clients import x402_httpx_transport
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC

from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.sessions.test_official_client_sessions import FAST_CLAIMS, ROUTES, wait_for
from tests.support.gateway import SESSIONS, running_gateway, sqlite_url

PRICE = 1_000


def fresh_client(payer: LocalAccount, rpc_url: str) -> x402Client:
    """The official client with empty channel storage; its signer reads the chain (to recover a channel)."""
    client = x402Client()
    client.register("eip155:8453", BatchSettlementEvmScheme(EthAccountSignerWithRPC(payer, rpc_url=rpc_url)))
    return client


class Wire(httpx.AsyncBaseTransport):
    """The transport under the official client's: it sees every answer (the corrective 402s the client handles)."""

    def __init__(self, seen: list[httpx.Response]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen = seen

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.headers.get("payment-signature"):
            self.seen.append(response)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def pay(client: x402Client, url: str, n: int, seen: list[httpx.Response]) -> list[httpx.Response]:
    """``n`` paid requests; ``seen`` collects every answer to a paid attempt on the wire."""
    out = []
    async with httpx.AsyncClient(transport=x402_httpx_transport(client, Wire(seen)), timeout=30) as http:
        for _ in range(n):
            out.append(await http.get(url))
    return out


def cumulative(response: httpx.Response) -> int:
    doc = decode_header(response.headers["payment-response"])
    return int(doc["extra"]["channelState"]["chargedCumulativeAmount"])


def test_a_client_with_fresh_storage_resynchronises_from_the_corrective_402_and_pays_on(
    base_chain: DevChain, tmp_path: Any
) -> None:
    payer = base_chain.new_payer(5_000_000)
    store = sqlite_url(tmp_path)
    quiet = {**SESSIONS, "min_deposit": "0.05", "claim_interval": 3600}  # charges stay unclaimed meanwhile
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=quiet) as gw:
        url = gw.url + "/session"
        pay_to = gw.pay_to
        paid_before = gw.balance(pay_to)
        first: list[httpx.Response] = []
        a = fresh_client(payer, base_chain.url)
        done = asyncio.run(pay(a, url, 3, first))
        assert [r.status_code for r in done] == [200] * 3
        assert [r.status_code for r in first] == [200] * 3  # paid at the first attempt each
        assert [cumulative(r) for r in done] == [PRICE, 2 * PRICE, 3 * PRICE]
        deposits = base_chain.balance(payer.address)

        # The wallet's owner reinstalls: same key, no local records. The chain says 0 claimed; we charged 3.
        seen: list[httpx.Response] = []
        b = fresh_client(payer, base_chain.url)
        resumed = asyncio.run(pay(b, url, 4, seen))
        assert [r.status_code for r in resumed] == [200] * 4, resumed[-1].text
        assert [cumulative(r) for r in resumed] == [4 * PRICE, 5 * PRICE, 6 * PRICE, 7 * PRICE]
        # one corrective 402 (its voucher was built from the chain's 0), then it paid on from our cumulative
        assert [r.status_code for r in seen] == [402, 200, 200, 200, 200]
        assert decode_header(seen[0].headers["payment-required"])["error"] == reasons.SESSION_CUMULATIVE_MISMATCH
        assert base_chain.balance(payer.address) == deposits  # the channel was recovered, not opened again

        # The first client's records are now stale too (it believes 3 were charged): it resynchronises the same way.
        seen.clear()
        again = asyncio.run(pay(a, url, 1, seen))
        assert again[0].status_code == 200 and cumulative(again[0]) == 8 * PRICE
        assert [r.status_code for r in seen] == [402, 200]
        assert len(gw.upstream.requests) == 8  # each paid request served once; the stale vouchers bought nothing
    # Claimed and swept by a gateway on the same store: the receiver gets exactly what was charged.
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=FAST_CLAIMS, pay_to=pay_to) as gw:
        wait_for(lambda: gw.balance(pay_to) - paid_before == 8 * PRICE)
