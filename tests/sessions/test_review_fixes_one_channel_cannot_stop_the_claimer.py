"""One channel, ours or a stranger's, must never stop the claims of the others (docs/threat-model.md T46): every
channel whose claim does not land can be withdrawn by its payer once the delay ends.

* The settlement contract is shared by every x402 server: a stranger's ``WithdrawInitiated`` (here with a balance
  no store keeps exactly) is not ours to read or record, and our withdrawing channel in the same logs is claimed.
* A channel whose claim would revert (drained by a withdrawal the claimer never saw) is left out, tried again after
  a pause, and claimed for what is left in it; channels that can no longer be claimed do not hold the claimer's
  scan, so the honest channels behind them are claimed.

A private chain (its clock is moved past the withdrawal delay); payers call the contract directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_utils.crypto import keccak

from gateway.dev.chain import BATCH_SETTLEMENT_ADDRESS, DevChain, start_dev_chain
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.sessions.test_official_client_sessions import engine_of, wait_for
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url

PRICE = 1_000
DEPOSIT = 10_000
ROUTES: list[dict[str, Any]] = [{"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]}]
# Passes every 0.2 s; nothing is old or large enough to claim: only a withdrawal makes this claimer claim.
WATCHING = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 0.2, "claim_after": 3600, "settle_interval": 0.2}
QUIET = {**WATCHING, "claim_interval": 3600}  # no pass at all
CLAIMING = {**WATCHING, "claim_after": 1.0}  # everything owed is claimed a second after this gateway saw it


@pytest.fixture(scope="module")
def chain() -> Iterator[DevChain]:
    dev = start_dev_chain(8453)
    try:
        yield dev
    finally:
        dev.stop()


def open_and_charge(gw: GatewayUnderTest, chain: DevChain, requests: int) -> CraftedChannel:
    url = gw.url + "/session"
    ch = CraftedChannel.from_offer(chain.new_payer(1_000_000), session_offer(httpx.get(url)))
    assert httpx.get(url, headers=ch.header(ch.deposit(DEPOSIT, voucher_max=PRICE)), timeout=30).status_code == 200
    for n in range(2, requests + 1):
        assert httpx.get(url, headers=ch.header(ch.paying(n * PRICE)), timeout=30).status_code == 200
    return ch


def test_a_strangers_withdrawal_on_the_shared_contract_does_not_stop_our_claims(
    chain: DevChain, tmp_path: Path
) -> None:
    with running_gateway(chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=WATCHING) as gw:
        offer = session_offer(httpx.get(gw.url + "/session"))
        # Another receiver's channel, funded beyond 2^53 (a self-minted token and its own collector cost a few
        # cents), starts a withdrawal: three transactions that once stopped every claim and sweep for good.
        stranger = CraftedChannel.from_offer(
            Account.create(), offer, receiver=Account.create().address, receiver_authorizer=Account.create().address
        )
        slot = keccak(bytes.fromhex(stranger.id[2:]) + (0).to_bytes(32, "big"))  # channels[id].balance
        chain.rpc("anvil_setStorageAt", [BATCH_SETTLEMENT_ADDRESS, "0x" + slot.hex(), "0x" + f"{2**60:064x}"])
        stranger.call_as_payer(chain, "initiateWithdraw", 1)
        assert stranger.onchain(chain).withdraw_initiated_at > 0

        ours = open_and_charge(gw, chain, 3)
        ours.call_as_payer(chain, "initiateWithdraw", DEPOSIT)
        wait_for(lambda: ours.onchain(chain).total_claimed == 3 * PRICE, timeout=20)
        wait_for(lambda: chain.balance(gw.pay_to) == 3 * PRICE, timeout=20)  # and swept
        assert engine_of(gw).claimer.stats.withdrawals_seen == 1  # ours; the stranger's is none of our business


def test_drained_channels_neither_hold_the_claimer_nor_lose_what_is_left_in_them(
    chain: DevChain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_url(tmp_path)
    pay_to = Account.create().address
    with running_gateway(chain, store_url=store, routes=ROUTES, sessions=QUIET, pay_to=pay_to) as gw:
        drained = open_and_charge(gw, chain, 5)  # the oldest debts: first in the claimer's scan
        partly = open_and_charge(gw, chain, 5)
        honest = open_and_charge(gw, chain, 3)
    # While no claimer runs, two payers withdraw: one everything, one 8,000 of its 10,000 (5,000 were charged).
    drained.call_as_payer(chain, "initiateWithdraw", DEPOSIT)
    partly.call_as_payer(chain, "initiateWithdraw", 8 * PRICE)
    # The delay passes, over enough blocks that the next claimer's look-back (one delay's worth) and its re-read
    # of the last 256 blocks on later passes both miss the logs: its mirror of both channels is stale, so their
    # claims would revert.
    chain.rpc("anvil_mine", [hex(400), hex(60)])
    drained.call_as_payer(chain, "finalizeWithdraw")
    partly.call_as_payer(chain, "finalizeWithdraw")
    assert (drained.onchain(chain).balance, partly.onchain(chain).balance) == (0, 2 * PRICE)

    # A claimer whose scan holds two channels: the two that cannot be claimed in full fill it.
    monkeypatch.setattr("gateway.engine.claimer._SCAN", 2)
    with running_gateway(chain, store_url=store, routes=ROUTES, sessions=CLAIMING, pay_to=pay_to) as gw:
        wait_for(lambda: honest.onchain(chain).total_claimed == 3 * PRICE, timeout=20)
        wait_for(lambda: partly.onchain(chain).total_claimed == 2 * PRICE, timeout=20)  # what the payer left
        wait_for(lambda: chain.balance(pay_to) == 5 * PRICE, timeout=20)
        assert drained.onchain(chain).total_claimed == 0
        assert engine_of(gw).claimer.stats.dropped >= 2  # both claims were tried as charged, and would revert
