"""Chain-fault fixtures: ``store_url`` runs a test once per store backend (SQLite file, real Redis), and
``journal`` gives a settlement journal on each backend; ``chain`` and ``rig`` are the reorg tests' own chain and
relayer."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from eth_account import Account

from gateway.chain.rpc import ChainRpc
from gateway.config import Secret
from gateway.dev.chain import DevChain, set_eth_balance
from gateway.storage.settlements import SettlementJournal, SQLiteSettlementJournal, open_settlement_journal
from tests.chain.test_reorged_settlements import Rig


@pytest.fixture
def chain(private_chain: DevChain) -> DevChain:
    """The reorg tests' chain: their own (tests/conftest.py ``private_chain``), since they reorganise it."""
    return private_chain


@pytest.fixture
async def rig(chain: DevChain, tmp_path: Path) -> AsyncIterator[Rig]:
    """A funded relayer key, an RPC client and a settlement journal on ``chain``."""
    async with aiohttp.ClientSession() as session:
        rpc = ChainRpc("base", chain.chain_id, [Secret(chain.url)])
        await rpc.start(session)
        key = "0x" + os.urandom(32).hex()
        set_eth_balance(chain.anvil, Account.from_key(key).address, 10**20)
        journal = SQLiteSettlementJournal(str(tmp_path / "journal.db"))
        try:
            yield Rig(chain, rpc, key, journal)
        finally:
            await journal.aclose()


@pytest.fixture
async def journal(store_url: str) -> AsyncIterator[SettlementJournal]:
    j = open_settlement_journal(store_url)
    try:
        yield j
    finally:
        await j.aclose()
