"""The development kit itself: Redis restarts, anvil lifecycle, dev keys, reproducible artifacts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from eth_abi import decode, encode
from eth_account import Account
from eth_utils import keccak

from gateway.chain.abi import MULTICALL3_ADDRESS
from gateway.dev.chain import (
    BATCH_SETTLEMENT_ADDRESS,
    DEV_KEYS,
    DEV_MNEMONIC,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    Anvil,
    DevChain,
    RedisServer,
    RpcError,
    call,
    find_anvil,
    load_artifact,
    set_eth_balance,
)

ROOT = Path(__file__).resolve().parents[2]


def test_redis_restart_keeps_port_and_persistent_data(redis_server: RedisServer, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set("survives", "yes")
    port = redis_server.port
    redis_server.stop()
    assert not redis_server.ping()
    with pytest.raises(redis.ConnectionError):
        client.get("survives")
    redis_server.start()
    assert redis_server.port == port and redis_server.url == redis_url
    assert client.get("survives") == b"yes"  # same client object reconnects: same URL
    client.close()


def test_redis_url_fixture_starts_empty_and_running_after_a_test_stopped_it(
    redis_server: RedisServer, redis_url: str
) -> None:
    # The previous test left a key behind; this one must see none, and the server must be up.
    assert redis.Redis.from_url(redis_url).dbsize() == 0
    redis_server.stop()  # left stopped on purpose: the next user must get it running again


def test_redis_is_running_again_for_the_next_user(redis_server: RedisServer) -> None:
    assert redis_server.ping()


def test_non_persistent_redis_loses_data_on_restart() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.stop()
        server.start()
        assert client.get("k") is None
        client.close()


def test_dev_keys_are_anvils_funded_default_accounts(base_chain: DevChain) -> None:
    accounts = base_chain.rpc("eth_accounts")
    assert [Account.from_key(k).address.lower() for k in DEV_KEYS] == [a.lower() for a in accounts]
    Account.enable_unaudited_hdwallet_features()
    derived = Account.from_mnemonic(DEV_MNEMONIC, account_path="m/44'/60'/0'/0/3")
    assert derived.key.to_0x_hex() == DEV_KEYS[3]


def test_anvil_stops_and_frees_its_process() -> None:
    anvil = Anvil(chain_id=31337).start()
    proc = anvil._proc
    assert proc is not None and int(anvil.rpc("eth_chainId"), 16) == 31337
    anvil.stop()
    assert proc.poll() is not None and not anvil.running


def test_set_eth_balance_and_new_payer_funding(base_chain: DevChain) -> None:
    payer = base_chain.new_payer(123)
    assert base_chain.balance(payer.address) == 123
    assert int(base_chain.rpc("eth_getBalance", [payer.address, "latest"]), 16) == 0
    set_eth_balance(base_chain.anvil, payer.address, 10**18)
    assert int(base_chain.rpc("eth_getBalance", [payer.address, "latest"]), 16) == 10**18


def test_find_anvil_names_the_install_script_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X402_ANVIL_BIN", "/nonexistent/anvil")
    with pytest.raises(FileNotFoundError, match="X402_ANVIL_BIN"):
        find_anvil()
    monkeypatch.delenv("X402_ANVIL_BIN")
    monkeypatch.setattr("gateway.dev.paths.REPO_ROOT", Path("/nonexistent"))
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match=r"scripts/install-tools\.sh"):
        find_anvil()


def test_gateway_abi_subsets_come_from_the_test_token() -> None:
    usdc = load_artifact("TestUSDC")["abi"]
    subset = load_artifact("eip3009")["abi"]
    assert all(entry in usdc for entry in subset)
    names = sorted((e["type"], e["name"], len(e["inputs"])) for e in subset)
    assert ("function", "transferWithAuthorization", 7) in names
    assert ("function", "transferWithAuthorization", 9) in names
    assert [e["name"] for e in load_artifact("erc1271")["abi"]] == ["isValidSignature"]


def test_committed_artifacts_match_a_fresh_build() -> None:
    node = shutil.which("node")
    if node is None or not (ROOT / ".tools/node_modules/solc").is_dir():
        pytest.fail("node and .tools/node_modules/solc are needed: run scripts/install-tools.sh", pytrace=False)
    result = subprocess.run(
        [node, "contracts/build.mjs", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    artifact = json.loads((ROOT / "contracts_abi/TestUSDC.json").read_text())
    assert sorted(artifact) == ["abi", "bytecode", "compiler", "contractName", "deployedBytecode"]


def test_dev_chain_has_the_batch_settlement_contracts_at_their_canonical_addresses(base_chain: DevChain) -> None:
    assert base_chain.sessions is not None
    assert base_chain.sessions.settlement == BATCH_SETTLEMENT_ADDRESS
    assert base_chain.sessions.erc3009_collector == ERC3009_DEPOSIT_COLLECTOR_ADDRESS
    runtime = load_artifact("X402BatchSettlement")["deployedBytecode"]
    assert base_chain.rpc("eth_getCode", [BATCH_SETTLEMENT_ADDRESS, "latest"]) == runtime
    # The collector's immutable names the canonical settlement contract.
    out = call(base_chain.anvil, ERC3009_DEPOSIT_COLLECTOR_ADDRESS, keccak(text="x402BatchSettlement()")[:4])
    assert decode(["address"], out)[0].lower() == BATCH_SETTLEMENT_ADDRESS.lower()


def test_multicall3_try_aggregate_reports_failures_unless_success_is_required(base_chain: DevChain) -> None:
    """The official facilitator reads channel state through Multicall3's tryAggregate."""
    balance_of = keccak(text="balanceOf(address)")[:4] + encode(["address"], [MULTICALL3_ADDRESS])
    calls = [(base_chain.usdc, balance_of), (base_chain.usdc, b"\xde\xad\xbe\xef")]
    selector = keccak(text="tryAggregate(bool,(address,bytes)[])")[:4]
    out = call(base_chain.anvil, MULTICALL3_ADDRESS, selector + encode(["bool", "(address,bytes)[]"], [False, calls]))
    (results,) = decode(["(bool,bytes)[]"], out)
    assert [ok for ok, _ in results] == [True, False]
    assert decode(["uint256"], results[0][1]) == (base_chain.balance(MULTICALL3_ADDRESS),)
    with pytest.raises(RpcError, match="Multicall3: call failed"):
        call(base_chain.anvil, MULTICALL3_ADDRESS, selector + encode(["bool", "(address,bytes)[]"], [True, calls]))
