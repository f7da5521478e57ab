"""Facilitator mode end to end: the gateway delegates verify/settle to the x402 package's own facilitator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.devchain import DevChain
from gateway.protocol.codec import decode_header
from tests.e2e.test_official_client import pay_with_official_client
from tests.support.facilitator import FacilitatorControl, refused_url, run_x402_facilitator
from tests.support.gateway import running_gateway, sqlite_url


def facilitator_networks(chain: DevChain, url: str) -> dict[str, Any]:
    return {
        "base": {
            "rpc_urls": [chain.url],
            "receipt_poll_interval": 0.02,
            "verifier": "facilitator",
            "facilitator": {"url": url, "timeout": 5.0},
        }
    }


@pytest.fixture
def control() -> FacilitatorControl:
    return FacilitatorControl()


@pytest.fixture
def facilitator_url(base_chain: DevChain, control: FacilitatorControl) -> Any:
    with run_x402_facilitator(base_chain, control=control) as url:
        yield url


def test_official_client_pays_through_the_facilitator_once(
    base_chain: DevChain, tmp_path: Path, facilitator_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), networks=facilitator_networks(base_chain, facilitator_url)
    ) as gw:
        before = gw.balance(payer.address)
        response = asyncio.run(pay_with_official_client(gw.url + "/paid", payer))
        assert response.status_code == 200, response.text
        receipt = decode_header(response.headers["payment-response"])
        mined = base_chain.rpc("eth_getTransactionReceipt", [receipt["transaction"]])
        assert int(mined["status"], 16) == 1
        assert gw.balance(payer.address) == before - 100_000
        assert gw.balance(gw.pay_to) == 100_000
        assert len(gw.upstream.requests) == 1


def _signed_request(gw: Any, payer: Any, path: str = "/paid") -> tuple[httpx.Response, dict[str, str]]:
    with gw.client() as http:
        first = http.post(path, json={})
        name, value = gw.sign(payer, first)
        return first, {name: value}


@pytest.mark.parametrize(
    ("mode", "status", "reason"),
    [
        ("invalid", 402, "invalid_exact_evm_payload_signature"),
        ("error", 503, "facilitator_unavailable"),
        ("garbage", 502, "facilitator_bad_answer"),
    ],
)
def test_facilitator_failures_map_to_their_status_and_charge_nothing(
    base_chain: DevChain,
    tmp_path: Path,
    facilitator_url: str,
    control: FacilitatorControl,
    mode: str,
    status: int,
    reason: str,
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), networks=facilitator_networks(base_chain, facilitator_url)
    ) as gw:
        _, headers = _signed_request(gw, payer)
        control.mode = mode  # type: ignore[assignment]
        control.reason = "invalid_exact_evm_payload_signature"
        with gw.client() as http:
            refused = http.post("/paid", json={}, headers=headers)
        assert refused.status_code == status, refused.text
        assert refused.json()["error"] == reason
        assert gw.upstream.requests == []
        assert gw.balance(payer.address) == 1_000_000
        # The facilitator recovers: the same payment was not consumed by the failure and works once.
        control.mode = "normal"
        with gw.client() as http:
            ok = http.post("/paid", json={}, headers=headers)
            again = http.post("/paid", json={}, headers=headers)
        assert ok.status_code == 200, ok.text
        assert again.status_code == 402
        assert again.json()["error"] == "payment_already_used"
        assert gw.balance(payer.address) == 900_000


def test_unreachable_facilitator_fails_start_with_a_clear_message(base_chain: DevChain, tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        running_gateway(
            base_chain, store_url=sqlite_url(tmp_path), networks=facilitator_networks(base_chain, refused_url())
        ),
    ):
        pass


def test_facilitator_without_support_for_the_network_fails_start(
    base_chain: DevChain, tmp_path: Path, facilitator_url: str, control: FacilitatorControl
) -> None:
    control.mode = "canned"  # type: ignore[assignment]
    control.canned = {"kinds": [{"x402Version": 2, "scheme": "exact", "network": "eip155:137"}]}
    control.status = 200
    with (
        pytest.raises(RuntimeError),
        running_gateway(
            base_chain, store_url=sqlite_url(tmp_path), networks=facilitator_networks(base_chain, facilitator_url)
        ),
    ):
        pass
