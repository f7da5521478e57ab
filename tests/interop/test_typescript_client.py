"""The official TypeScript client (`@x402/fetch` + `@x402/evm`, the npm packages most x402 buyers use) pays the
gateway: v2 (PAYMENT-SIGNATURE) and v1 (X-PAYMENT, when the 402 offers only the v1 body), once, with a receipt it
can decode. Its packages are installed by scripts/install-tools.sh into .tools/x402-ts/."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.e2e.helpers import Balances
from tests.e2e.test_official_client import strip_v2_challenge
from tests.support.gateway import running_gateway, sqlite_url

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("pay_with_x402_fetch.mjs")
MODULES = ROOT / ".tools" / "x402-ts" / "node_modules"
PRICE = 100_000


def hex_key(account: Any) -> str:
    return "0x" + account.key.hex().removeprefix("0x")


def pay_with_x402_fetch(url: str, key: str, method: str = "POST") -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not (MODULES / "@x402" / "fetch").is_dir():
        pytest.fail("node and @x402/fetch are needed: run scripts/install-tools.sh", pytrace=False)
    done = subprocess.run(
        [node, str(SCRIPT), str(MODULES), url, key, method], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


@pytest.mark.parametrize("version", [2, 1])
def test_the_official_typescript_client_pays_once_and_reads_its_receipt(
    base_chain: DevChain, tmp_path: Path, version: int
) -> None:
    payer = base_chain.new_payer(1_000_000)
    wrap = strip_v2_challenge if version == 1 else None
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), wrap=wrap) as gw:
        money = Balances(gw, payer.address)
        answer = pay_with_x402_fetch(gw.url + "/paid", hex_key(payer))
        assert answer["status"] == 200, answer
        header = "payment-response" if version == 2 else "x-payment-response"
        receipt = decode_header(answer["headers"][header])
        assert receipt["success"] is True and receipt["payer"].lower() == payer.address.lower()
        mined = base_chain.rpc("eth_getTransactionReceipt", [receipt["transaction"]])
        assert int(mined["status"], 16) == 1
        sent = gw.upstream.requests
        assert len(sent) == 1
        money.assert_charged_once(PRICE)


def test_the_typescript_client_pays_a_get_route_with_its_own_price(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        money = Balances(gw, payer.address)
        answer = pay_with_x402_fetch(gw.url + "/cheap", hex_key(payer), method="GET")
        assert answer["status"] == 200, answer
        assert [r.method for r in gw.upstream.requests] == ["GET"]
        money.assert_charged_once(10_000)


def test_a_typescript_client_without_the_money_gets_a_402_it_can_read_and_nothing_is_served(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(0)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        answer = pay_with_x402_fetch(gw.url + "/paid", hex_key(payer))
        assert answer["status"] == 402, answer
        assert decode_header(answer["headers"]["payment-required"])["error"] == reasons.INSUFFICIENT_BALANCE
        assert json.loads(answer["body"])["error"] == reasons.INSUFFICIENT_BALANCE
        assert gw.upstream.requests == []
