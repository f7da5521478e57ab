"""Local development kit: a throw-away anvil chain with the project's own EIP-3009 token, and a Redis server.

Used by the test fixtures and by the ``demo`` command. Everything here is synchronous on purpose: pytest session
fixtures and a CLI command are sync, and nothing in here is on the gateway's request path.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

import gateway
from gateway.chain.abi import MULTICALL3_ADDRESS

__all__ = [
    "BASE_USDC",
    "CANONICAL_USDC",
    "DEPLOYER_KEY",
    "DEV_KEYS",
    "DEV_MNEMONIC",
    "MINTER_KEY",
    "POLYGON_USDC",
    "Anvil",
    "DevChain",
    "RedisServer",
    "RpcError",
    "TransactionReverted",
    "advance_time",
    "call",
    "deploy_contract",
    "deploy_test_usdc",
    "find_anvil",
    "install_multicall3",
    "load_artifact",
    "mint",
    "send_transaction",
    "set_eth_balance",
    "start_dev_chain",
    "token_balance",
    "wait_for_receipt",
]

_PACKAGE_DIR = Path(gateway.__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parent

BASE_USDC: Final = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
POLYGON_USDC: Final = "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359"
# chain id -> (USDC address, EIP-712 name, EIP-712 version), as deployed by Circle (x402-notes.md section 4).
CANONICAL_USDC: Final[dict[int, tuple[str, str, str]]] = {
    8453: (BASE_USDC, "USD Coin", "2"),
    84532: ("0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2"),
    137: (POLYGON_USDC, "USD Coin", "2"),
    80002: ("0x41E94Eb019C0762f9Bfcf9Fb1E58725BfB0e7582", "USDC", "2"),
}

DEV_MNEMONIC: Final = "test test test test test test test test test test test junk"
# The first 10 keys anvil derives from DEV_MNEMONIC (m/44'/60'/0'/0/i), each funded with 10,000 ETH at genesis.
# Hard-coded rather than derived so importing this module stays cheap and needs no HD-wallet features.
# Role convention: [0] deployer and gateway relayer; [9] this kit's minter, so test-side mints never race the
# relayer's nonces; the rest are free for tests (payTo addresses, extra payers).
DEV_KEYS: Final[tuple[str, ...]] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)
DEPLOYER_KEY: Final = DEV_KEYS[0]
MINTER_KEY: Final = DEV_KEYS[9]


# --------------------------------------------------------------------------------------------------------------
# child-process bookkeeping
# --------------------------------------------------------------------------------------------------------------

# Every child we start is tracked here so that an interpreter exit (normal, or via an uncaught exception in a
# test session) never leaves an anvil or redis-server behind holding a port.
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def _kill_all_children() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
        _LIVE.clear()
    for proc in procs:
        _terminate(proc)


atexit.register(_kill_all_children)


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # atexit does not run when the parent is SIGKILLed (e.g. a CI timeout); PR_SET_PDEATHSIG covers that case on
    # Linux. It fires when the *thread* that forked dies, hence only used when spawning from the main thread.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:  # noqa: S110 - best effort; atexit still covers the normal exit path
        pass


def _spawn(argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    use_pdeathsig = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
    proc = subprocess.Popen(  # noqa: S603 - argv is built by this module, never from user input
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if use_pdeathsig else None,  # noqa: PLW1509 - async-signal-safe enough here
    )
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def _reap(proc: subprocess.Popen[bytes]) -> None:
    _terminate(proc)
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_until(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log_path: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; log {log_path}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not become ready within {timeout:.0f} s; log {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(0.01)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------------------


class RedisServer:
    """A private ``redis-server`` on a free port, restartable on the same port (tests simulate outages with it).

    ``persistent=True`` writes an fsync-always append-only file in its own temp dir, so data survives stop/start.
    """

    def __init__(self, *, persistent: bool = False, binary: str | None = None) -> None:
        self.persistent = persistent
        self.binary = binary or os.environ.get("X402_REDIS_BIN") or shutil.which("redis-server") or ""
        if not self.binary:
            raise RuntimeError(
                "redis-server not found: install it (apt-get install redis-server) or set X402_REDIS_BIN"
            )
        # The port is chosen once so clients built from .url keep working across a stop()/start() cycle.
        self.port = _free_port()
        self.host = "127.0.0.1"
        self._dir = Path(tempfile.mkdtemp(prefix="x402-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        if self.running:
            return self
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self._dir),
            "--daemonize", "no",  # keep the Popen handle: stop() must be reliable
            "--save", "",  # no RDB snapshots: they would fork and race with stop()
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        log_path = self._dir / "redis.log"
        self._log = log_path.open("ab")
        self._proc = _spawn(argv, self._log)
        _wait_until(self.ping, self._proc, "redis-server", log_path, timeout)
        return self

    def ping(self) -> bool:
        """True when the server answers PING (speaks raw RESP so no client library is needed)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            # SIGTERM makes redis flush the AOF and exit cleanly; the port is free again once wait() returns.
            _reap(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop and delete the data directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()


# --------------------------------------------------------------------------------------------------------------
# anvil
# --------------------------------------------------------------------------------------------------------------

_ANVIL_NPM_BIN = Path(".tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
_LISTENING = re.compile(rb"Listening on ([0-9.]+):(\d+)")


def find_anvil() -> str:
    """Path of the anvil binary: $X402_ANVIL_BIN, then the repo's .tools/ (scripts/install-tools.sh), then PATH."""
    env = os.environ.get("X402_ANVIL_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise FileNotFoundError(f"X402_ANVIL_BIN={env} is not an executable file")
        return env
    local = _REPO_ROOT / _ANVIL_NPM_BIN
    if os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("anvil")
    if found:
        return found
    raise FileNotFoundError(
        "anvil not found: run scripts/install-tools.sh (installs it into .tools/), "
        "put foundry's anvil on PATH, or set X402_ANVIL_BIN"
    )


class RpcError(RuntimeError):
    """A JSON-RPC error answer; ``message`` carries anvil's text, e.g. the revert reason of an eth_call."""

    def __init__(self, method: str, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.method = method
        self.code = code
        self.message = message
        self.data = data


class TransactionReverted(RuntimeError):
    def __init__(self, receipt: dict[str, Any]) -> None:
        super().__init__(f"transaction {receipt.get('transactionHash')} reverted")
        self.receipt = receipt


def _json_rpc(url: str, method: str, params: Sequence[Any], timeout: float = 30.0) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    # S310: the url is always our own local node's http:// address, never user input.
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        answer: dict[str, Any] = json.loads(resp.read())
    if "error" in answer:
        err = answer["error"]
        raise RpcError(method, int(err.get("code", 0)), str(err.get("message", "")), err.get("data"))
    return answer.get("result")


class Anvil:
    """A private anvil node on a port of its own, automining unless ``block_time`` is set."""

    def __init__(
        self,
        *,
        chain_id: int = 8453,
        block_time: float | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.block_time = block_time
        self.host = host
        self.binary = binary
        self.port: int | None = None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("anvil is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / "anvil.log"

    def start(self, timeout: float = 30.0) -> Self:
        if self.running:
            return self
        binary = self.binary or find_anvil()
        self._dir = Path(tempfile.mkdtemp(prefix="x402-anvil-"))
        log_path = self._dir / "anvil.log"
        argv = [binary, "--host", self.host, "--port", "0", "--chain-id", str(self.chain_id), "--color", "never"]
        if self.block_time is not None:
            argv += ["--block-time", f"{self.block_time:g}"]
        # --port 0 lets anvil bind the port itself (no pick-then-bind race); it prints "Listening on host:port",
        # which we read back from the log file. The log also receives one line per RPC method, so it must not be a
        # pipe nobody drains.
        self._log = log_path.open("wb")
        self._proc = proc = _spawn(argv, self._log)

        def listening() -> bool:
            m = _LISTENING.search(log_path.read_bytes())
            if m is None:
                return False
            self.port = int(m.group(2))
            return True

        try:
            _wait_until(listening, proc, "anvil", log_path, timeout)
            _wait_until(self._answers, proc, "anvil", log_path, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        try:
            return int(_json_rpc(self.url, "eth_chainId", [], timeout=1.0), 16) == self.chain_id
        except (OSError, RpcError, ValueError):
            return False

    def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        return _json_rpc(self.url, method, params)

    def stop(self) -> None:
        if self._proc is not None:
            _reap(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------------------
# artifacts and transactions
# --------------------------------------------------------------------------------------------------------------


def load_artifact(name: str) -> dict[str, Any]:
    """contracts_abi/<name>.json: packaged next to the module in a wheel, at the repo root in a checkout."""
    for base in (_PACKAGE_DIR / "contracts_abi", _REPO_ROOT / "contracts_abi"):
        path = base / f"{name}.json"
        if path.is_file():
            data: dict[str, Any] = json.loads(path.read_text())
            return data
    raise FileNotFoundError(f"artifact {name}.json not found (rebuild with: node contracts/build.mjs)")


def _selector(signature: str) -> bytes:
    return bytes(keccak(text=signature)[:4])


def call(anvil: Anvil, to: str, data: bytes | str, *, block: str = "latest") -> bytes:
    """eth_call; raises RpcError (with the revert reason in its message) when the call reverts."""
    payload = data if isinstance(data, str) else "0x" + data.hex()
    result: str = anvil.rpc("eth_call", [{"to": to, "data": payload}, block])
    return bytes.fromhex(result.removeprefix("0x"))


def send_transaction(
    anvil: Anvil,
    key: str,
    to: str | None,
    data: bytes | str = b"",
    value: int = 0,
    *,
    gas: int | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Sign with ``key``, send, wait for the receipt and return it.

    Without ``gas`` the node estimates it, so a transaction that would revert fails early with an RpcError carrying
    the revert reason; pass ``gas`` to get it mined anyway. ``check`` raises TransactionReverted on status 0.
    """
    acct = Account.from_key(key)
    payload = data if isinstance(data, bytes) else bytes.fromhex(data.removeprefix("0x"))
    tx: dict[str, Any] = {"from": acct.address, "value": hex(value), "data": "0x" + payload.hex()}
    if to is not None:
        tx["to"] = to_checksum_address(to)
    if gas is None:
        # 20 % headroom: estimates are exact for these contracts, but a state change between estimate and
        # inclusion (interval mining) must not turn into an out-of-gas revert.
        gas = int(int(anvil.rpc("eth_estimateGas", [tx]), 16) * 1.2) + 10_000
    nonce = int(anvil.rpc("eth_getTransactionCount", [acct.address, "pending"]), 16)
    base_fee = int(anvil.rpc("eth_getBlockByNumber", ["latest", False])["baseFeePerGas"], 16)
    unsigned: dict[str, Any] = {
        "chainId": anvil.chain_id,
        "nonce": nonce,
        "gas": gas,
        "maxFeePerGas": 2 * base_fee + 10**9,
        "maxPriorityFeePerGas": 10**9,
        "value": value,
        "data": payload,
        "type": 2,
    }
    if to is not None:
        unsigned["to"] = to_checksum_address(to)
    signed = acct.sign_transaction(unsigned)
    tx_hash: str = anvil.rpc("eth_sendRawTransaction", [signed.raw_transaction.to_0x_hex()])
    receipt = wait_for_receipt(anvil, tx_hash, timeout=timeout)
    if check and int(receipt["status"], 16) != 1:
        raise TransactionReverted(receipt)
    return receipt


def wait_for_receipt(anvil: Anvil, tx_hash: str, *, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        receipt: dict[str, Any] | None = anvil.rpc("eth_getTransactionReceipt", [tx_hash])
        if receipt is not None:
            return receipt
        if time.monotonic() > deadline:
            raise TimeoutError(f"no receipt for {tx_hash} after {timeout:.0f} s")
        time.sleep(0.02)  # automine answers on the first poll; this only spins under --block-time


def deploy_contract(
    anvil: Anvil,
    artifact_name: str,
    constructor_args_types: Sequence[str] = (),
    args: Sequence[Any] = (),
    *,
    key: str = DEPLOYER_KEY,
) -> str:
    """Deploy contracts_abi/<artifact_name>.json with ABI-encoded constructor args; returns the checksummed address."""
    bytecode = bytes.fromhex(load_artifact(artifact_name)["bytecode"].removeprefix("0x"))
    data = bytecode + (abi_encode(list(constructor_args_types), list(args)) if constructor_args_types else b"")
    receipt = send_transaction(anvil, key, None, data)
    return str(to_checksum_address(receipt["contractAddress"]))


def deploy_test_usdc(anvil: Anvil, *, name: str = "USD Coin", version: str = "2", at: str | None = None) -> str:
    """Deploy TestUSDC; with ``at``, copy its runtime code there (anvil_setCode) and return that address instead.

    The runtime code is read back with eth_getCode rather than taken from the artifact because the artifact's
    deployedBytecode has zero placeholders where the name/version immutables go.
    """
    address = deploy_contract(anvil, "TestUSDC", ["string", "string"], [name, version])
    if at is None:
        return address
    code = anvil.rpc("eth_getCode", [address, "latest"])
    target = str(to_checksum_address(at))
    anvil.rpc("anvil_setCode", [target, code])
    return target


def install_multicall3(anvil: Anvil) -> str:
    """Put contracts/Multicall3.sol's runtime code at Multicall3's canonical address (the gateway batches
    settlements through it where the chain has it); returns the address."""
    anvil.rpc("anvil_setCode", [MULTICALL3_ADDRESS, load_artifact("Multicall3")["deployedBytecode"]])
    return MULTICALL3_ADDRESS


def mint(anvil: Anvil, token: str, to: str, amount: int, *, key: str = MINTER_KEY) -> dict[str, Any]:
    """TestUSDC.mint (open to anyone). Sent by DEV_KEYS[9] so it never takes a nonce from the relayer key."""
    data = _selector("mint(address,uint256)") + abi_encode(["address", "uint256"], [to, amount])
    return send_transaction(anvil, key, token, data)


def token_balance(anvil: Anvil, token: str, address: str) -> int:
    out = call(anvil, token, _selector("balanceOf(address)") + abi_encode(["address"], [address]))
    value: int = abi_decode(["uint256"], out)[0]
    return value


def set_eth_balance(anvil: Anvil, address: str, wei: int) -> None:
    anvil.rpc("anvil_setBalance", [to_checksum_address(address), hex(wei)])


def advance_time(anvil: Anvil, seconds: int) -> int:
    """Move the chain clock forward and mine a block; returns the new block timestamp."""
    anvil.rpc("evm_increaseTime", [seconds])
    anvil.rpc("evm_mine", [])
    return int(anvil.rpc("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)


# --------------------------------------------------------------------------------------------------------------
# the bundle tests and the demo use
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DevChain:
    """A running anvil with TestUSDC deployed (at the canonical USDC address when impersonating a known chain)."""

    anvil: Anvil
    usdc: str
    token_name: str = "USD Coin"  # noqa: S105 - an EIP-712 domain name, not a secret
    token_version: str = "2"  # noqa: S105
    relayer_key: str = field(default=DEPLOYER_KEY)

    @property
    def chain_id(self) -> int:
        return self.anvil.chain_id

    @property
    def url(self) -> str:
        return self.anvil.url

    @property
    def network(self) -> str:
        """CAIP-2 id, as x402 v2 names networks."""
        return f"eip155:{self.chain_id}"

    def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        return self.anvil.rpc(method, params)

    def new_payer(self, amount: int = 10_000_000) -> LocalAccount:
        """A fresh random account holding ``amount`` atomic USDC (and no ETH: EIP-3009 payers never need gas)."""
        acct: LocalAccount = Account.create()
        if amount:
            mint(self.anvil, self.usdc, acct.address, amount)
        return acct

    def mint(self, to: str, amount: int) -> None:
        mint(self.anvil, self.usdc, to, amount)

    def balance(self, addr: str) -> int:
        return token_balance(self.anvil, self.usdc, addr)

    def stop(self) -> None:
        self.anvil.stop()


_CANONICAL: Final = "canonical"


def start_dev_chain(
    chain_id: int = 8453,
    *,
    block_time: float | None = None,
    usdc_at: str | None = _CANONICAL,
    token_name: str | None = None,
    token_version: str | None = None,
    multicall: bool = True,
) -> DevChain:
    """Start anvil and deploy TestUSDC (and, unless ``multicall`` is False, Multicall3 at its canonical address,
    as on Base and Polygon).

    ``usdc_at``: "canonical" (default) puts the token at Circle's USDC address when ``chain_id`` is one of
    CANONICAL_USDC, else leaves it where it was deployed; None always leaves it there; an address puts it there.
    The EIP-712 name/version default to the real token's for known chains, else "USD Coin" / "2".
    """
    known = CANONICAL_USDC.get(chain_id)
    name = token_name or (known[1] if known else "USD Coin")
    version = token_version or (known[2] if known else "2")
    at = (known[0] if known else None) if usdc_at == _CANONICAL else usdc_at
    anvil = Anvil(chain_id=chain_id, block_time=block_time).start()
    try:
        usdc = deploy_test_usdc(anvil, name=name, version=version, at=at)
        if multicall:
            install_multicall3(anvil)
    except BaseException:
        anvil.stop()
        raise
    return DevChain(anvil=anvil, usdc=usdc, token_name=name, token_version=version)
