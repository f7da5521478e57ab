"""The official TypeScript client (`@x402/fetch` + `@x402/evm`'s `batch-settlement` client scheme) pays the gateway
by session on the anvil fixture: one deposit, then a voucher per request (no transaction each), each upstream call
once, and after claim + sweep ``payTo`` gained exactly the sum charged; its cooperative refund returns exactly the
unclaimed remainder; a fresh client (same key, records lost) resynchronises through the corrective 402 and pays on.
The wire is in docs/sessions.md; the client's packages are installed by scripts/install-tools.sh into .tools/x402-ts/.
"""

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
from tests.interop.test_typescript_client import hex_key
from tests.sessions.test_official_client_sessions import FAST_CLAIMS, ROUTES, engine_of, relayer_nonce, wait_for
from tests.support.gateway import SESSIONS, running_gateway, sqlite_url

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("pay_by_session_with_x402_fetch.mjs")
MODULES = ROOT / ".tools" / "x402-ts" / "node_modules"
CLIENT = MODULES / "@x402" / "evm" / "dist" / "esm" / "batch-settlement" / "client"
PRICE = 1_000  # the /session route's price: the voucher's ceiling
DEPOSIT = 1_000_000  # FAST_CLAIMS' min_deposit, which the client deposits


def pay_by_session(url: str, key: str, count: int, *, rpc_url: str | None = None, refund: bool = False) -> Any:
    """Runs the TS client once (a fresh client: its channel records live in that process only)."""
    node = shutil.which("node")
    if node is None or not CLIENT.is_dir() or not (MODULES / "@x402" / "fetch").is_dir():
        pytest.skip("node and @x402/fetch + @x402/evm (batch-settlement) are needed: run scripts/install-tools.sh")
    argv = [node, str(SCRIPT), str(MODULES), url, key, str(count), rpc_url or "-", "refund" if refund else ""]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def receipt(answer: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = decode_header(answer["headers"]["payment-response"])
    return doc


def sent(attempt: dict[str, Any]) -> dict[str, Any]:
    """The payload the client put on the wire for one paid attempt."""
    doc: dict[str, Any] = decode_header(attempt["signature"])
    return doc


def cumulative(answer: dict[str, Any]) -> int:
    return int(receipt(answer)["extra"]["channelState"]["chargedCumulativeAmount"])


def test_the_typescript_client_deposits_once_then_pays_by_voucher_and_pay_to_gains_exactly_the_sum(
    base_chain: DevChain, tmp_path: Path
) -> None:
    n = 25
    payer = base_chain.new_payer(5_000_000)
    store = sqlite_url(tmp_path)
    quiet = {**FAST_CLAIMS, "claim_interval": 3600}  # no claims while the requests run
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=quiet) as gw:
        pay_to = gw.pay_to
        paid_before = gw.balance(pay_to)
        payer_before = base_chain.balance(payer.address)
        txs_before = relayer_nonce(base_chain)
        out = pay_by_session(gw.url + "/session", hex_key(payer), n)
        assert out["error"] is None, out
        assert [r["status"] for r in out["responses"]] == [200] * n, out["responses"][-1]
        assert len(gw.upstream.requests) == n  # each paid request reached the upstream once
        assert [r["status"] for r in out["wire"]] == [200] * n  # paid at the first attempt each
        kinds = [sent(a)["payload"]["type"] for a in out["wire"]]
        assert kinds == ["deposit"] + ["voucher"] * (n - 1)
        assert all(sent(a)["accepted"]["scheme"] == "batch-settlement" for a in out["wire"])
        receipts = [receipt(r) for r in out["responses"]]
        assert receipts[0]["transaction"] and all(r["transaction"] == "" for r in receipts[1:])
        assert [int(r["extra"]["chargedAmount"]) for r in receipts] == [PRICE] * n
        assert [cumulative(r) for r in out["responses"]] == [PRICE * (i + 1) for i in range(n)]
        assert relayer_nonce(base_chain) - txs_before == 1  # the deposit, and nothing per request
        assert payer_before - base_chain.balance(payer.address) == DEPOSIT
    # A gateway on the same store claims the charges and sweeps them to pay_to.
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=FAST_CLAIMS, pay_to=pay_to) as gw:
        wait_for(lambda: gw.balance(pay_to) - paid_before == n * PRICE)
        stats = engine_of(gw).claimer.stats
        assert stats.vouchers_claimed == 1 and stats.value_claimed == n * PRICE


def test_the_typescript_clients_cooperative_refund_returns_exactly_the_unclaimed_remainder(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(5_000_000)
    sessions = {**SESSIONS, "min_deposit": "1.00", "claim_interval": 3600}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=sessions) as gw:
        start = base_chain.balance(payer.address)
        out = pay_by_session(gw.url + "/session", hex_key(payer), 7, refund=True)
        assert out["error"] is None, out
        assert [r["status"] for r in out["responses"]] == [200] * 7
        settle = out["refund"]
        assert settle["success"] is True, settle
        assert int(settle["amount"]) == DEPOSIT - 7 * PRICE  # what the client reads as refunded
        mined = base_chain.rpc("eth_getTransactionReceipt", [settle["transaction"]])
        assert int(mined["status"], 16) == 1
        # all but what the seven requests were charged came back; the charged part was claimed for us
        assert base_chain.balance(payer.address) == start - 7 * PRICE
        refund_attempt = out["wire"][-1]
        assert sent(refund_attempt)["payload"]["type"] == "refund"
        assert int(sent(refund_attempt)["payload"]["voucher"]["maxClaimableAmount"]) == 7 * PRICE
        assert len(gw.upstream.requests) == 7  # the refund never reached the upstream


def test_a_fresh_typescript_client_resynchronises_from_the_corrective_402_and_pays_on(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(5_000_000)
    store = sqlite_url(tmp_path)
    quiet = {**SESSIONS, "min_deposit": "0.05", "claim_interval": 3600}  # charges stay unclaimed meanwhile
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=quiet) as gw:
        url = gw.url + "/session"
        pay_to = gw.pay_to
        paid_before = gw.balance(pay_to)
        first = pay_by_session(url, hex_key(payer), 3, rpc_url=base_chain.url)
        assert first["error"] is None, first
        assert [cumulative(r) for r in first["responses"]] == [PRICE, 2 * PRICE, 3 * PRICE]
        after_deposit = base_chain.balance(payer.address)

        # Same key, no local records: the client reads the chain (0 claimed) and signs from there; we charged 3.
        again = pay_by_session(url, hex_key(payer), 4, rpc_url=base_chain.url)
        assert again["error"] is None, again
        assert [r["status"] for r in again["responses"]] == [200] * 4, again["responses"][-1]
        assert [cumulative(r) for r in again["responses"]] == [4 * PRICE, 5 * PRICE, 6 * PRICE, 7 * PRICE]
        # one corrective 402 (its voucher was built from the chain's 0), then it paid on from our cumulative
        assert [a["status"] for a in again["wire"]] == [402, 200, 200, 200, 200]
        corrective = decode_header(again["wire"][0]["headers"]["payment-required"])
        assert corrective["error"] == reasons.SESSION_CUMULATIVE_MISMATCH
        assert [sent(a)["payload"]["type"] for a in again["wire"]] == ["voucher"] * 5  # no second deposit
        assert base_chain.balance(payer.address) == after_deposit
        assert len(gw.upstream.requests) == 7  # the stale voucher bought nothing
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=FAST_CLAIMS, pay_to=pay_to) as gw:
        wait_for(lambda: gw.balance(pay_to) - paid_before == 7 * PRICE)
