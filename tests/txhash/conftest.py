"""Fixtures for tx-hash proofs: store backends, a fake token, private chains (an old one, a lying one)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.dev.chain import BASE_USDC, Anvil, DevChain, deploy_test_usdc, find_anvil
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url


@pytest.fixture
def gw(base_chain: DevChain, tmp_path: Path) -> Iterator[GatewayUnderTest]:
    """A Base-only gateway with the default routes on a SQLite file."""
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        yield gw


@pytest.fixture(scope="module")
def fake_token(base_chain: DevChain) -> str:
    """TestUSDC's exact code at a fresh address: same name, same events, worthless."""
    return deploy_test_usdc(base_chain.anvil)


def _private_base(tmp_path: Path, *, genesis_age: int | None = None) -> DevChain:
    """A private anvil impersonating Base (chain id 8453, TestUSDC at Base's USDC address).

    ``genesis_age``: start the chain's clock that many seconds in the past (negative: in the future) with anvil's
    ``--timestamp``; every block it mines is then about that old: a stale transfer without sleeping. Done with a
    wrapper script around the anvil binary, so the dev kit needs no new option."""
    binary = find_anvil()
    if genesis_age is not None:
        wrapper = tmp_path / "anvil-in-the-past"
        wrapper.write_text(f'#!/bin/sh\nexec "{binary}" "$@" --timestamp {int(time.time()) - genesis_age}\n')
        wrapper.chmod(0o755)
        binary = str(wrapper)
    anvil = Anvil(chain_id=8453, binary=binary).start()
    try:
        usdc = deploy_test_usdc(anvil, at=BASE_USDC)
    except BaseException:
        anvil.stop()
        raise
    return DevChain(anvil=anvil, usdc=usdc)


@pytest.fixture
def old_chain(tmp_path: Path) -> Iterator[DevChain]:
    """A private Base whose blocks are all about two hours old."""
    chain = _private_base(tmp_path, genesis_age=7200)
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture
def future_chain(tmp_path: Path) -> Iterator[DevChain]:
    """A private Base whose blocks are all stamped about two hours in the future (a broken or lying node)."""
    chain = _private_base(tmp_path, genesis_age=-7200)
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture
def other_base(tmp_path: Path) -> Iterator[DevChain]:
    """A second, private chain with Base's chain id and USDC address that has not seen the shared chain's
    transfers (and has its own): a lying or forked RPC endpoint; also a chain a test may mine freely."""
    chain = _private_base(tmp_path)
    try:
        yield chain
    finally:
        chain.stop()
