"""Helpers for the chain-fault tests: private anvil chains (these tests reorganise, drop transactions and move the
chain's clock, so never on the session chains), a gateway whose finality tracker runs fast, and small waits."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from tests.support.gateway import GatewayUnderTest

PRICE = 100_000  # "/paid-before" and "/paid" cost 0.10 USDC


def fast_networks(chain: DevChain, **extra: Any) -> dict[str, Any]:
    """``[networks.base]`` for ``chain`` with a finality tracker that passes every 0.2 s."""
    return {
        "base": {
            "rpc_urls": [chain.url],
            "receipt_poll_interval": 0.02,
            "settlement_check_interval": 0.2,
            **extra,
        }
    }


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pay(gw: GatewayUnderTest, http: httpx.Client, payer: LocalAccount, path: str = "/paid-before") -> httpx.Response:
    """A 402, then the same request paid by ``payer``."""
    challenge = http.post(path, json={})
    assert challenge.status_code == 402, challenge.text
    name, value = gw.sign(payer, challenge)
    return http.post(path, json={}, headers={name: value})


def lost_metric(gw: GatewayUnderTest, network: str = "base") -> float:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    match = re.search(rf'^x402_gateway_settlements_lost_total\{{network="{network}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def head(chain: DevChain) -> int:
    return int(chain.rpc("eth_blockNumber"), 16)


def transactions_to(chain: DevChain, to: str, first_block: int) -> list[str]:
    """Hashes of every transaction to ``to`` mined from ``first_block`` to the head."""
    found = []
    for n in range(first_block, head(chain) + 1):
        block = chain.rpc("eth_getBlockByNumber", [hex(n), True])
        found += [tx["hash"] for tx in block["transactions"] if (tx.get("to") or "").lower() == to.lower()]
    return found


def relayer_pool(chain: DevChain, relayer: str) -> dict[str, dict[str, Any]]:
    """The relayer's transactions in the node's pool, pending and queued: nonce -> transaction."""
    content = chain.rpc("txpool_content")
    out: dict[str, dict[str, Any]] = {}
    for part in ("pending", "queued"):
        for sender, txs in content.get(part, {}).items():
            if sender.lower() == relayer.lower():
                out.update(txs)
    return out
