"""The development kit itself: Redis restarts, anvil lifecycle, dev keys, reproducible artifacts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from eth_account import Account

from gateway.dev.chain import (
    DEV_KEYS,
    DEV_MNEMONIC,
    Anvil,
    DevChain,
    RedisServer,
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
