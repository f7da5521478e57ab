"""``x402-gateway serve`` with ``[admin]``: the admin listener comes up beside the public one (never on it), and a
signal stops both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from gateway.dev.chain import DevChain
from tests.admin.conftest import READ_TOKEN, WRITE_TOKEN
from tests.support.gateway import network_name
from tests.support.processes import ROOT, free_port
from tests.support.servers import RecordingUpstream, serve_asgi


def _config(tmp_path: Path, chain: DevChain, upstream: str, port: int, admin_port: int) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
[upstream]
url = "{upstream}"
[store]
url = "sqlite:///{tmp_path / "receipts.db"}"
[payment]
pay_to = "{Account.create().address}"
relayer_key_env = "TEST_RELAYER_KEY"
[rate_limits]
enabled = false
[networks.{network_name(chain)}]
rpc_urls = ["{chain.url}"]
[admin]
listen = "127.0.0.1:{admin_port}"
tokens = [{{ env = "TEST_ADMIN_READ", access = "read" }}, {{ env = "TEST_ADMIN_WRITE", access = "write" }}]
audit_log = "audit.jsonl"
[[routes]]
route = "POST /paid"
price = "0.10"
"""
    )
    return path


def _start(config: Path, chain: DevChain, log: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        TEST_RELAYER_KEY=chain.relayer_key,
        TEST_ADMIN_READ=READ_TOKEN,
        TEST_ADMIN_WRITE=WRITE_TOKEN,
        PYTHONPATH=str(ROOT),
    )
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "-c", str(config), "--log-format", "text"]
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _answering(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 40
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)


def _eventually_priced(admin: str, price: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        routes = httpx.get(admin + "/admin/routes", headers={"authorization": f"Bearer {READ_TOKEN}"}).json()
        if routes["routes"][0]["price"] == price:
            return True
        time.sleep(0.1)
    return False


def test_serve_runs_the_admin_listener_beside_the_public_one(base_chain: DevChain, tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    log = tmp_path / "gateway.log"
    recording = RecordingUpstream()
    with serve_asgi(recording) as upstream:
        proc = _start(_config(tmp_path, base_chain, upstream, port, admin_port), base_chain, log)
        try:
            public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
            _answering(admin + "/admin/config", proc, log)
            assert httpx.get(public + "/healthz").status_code == 200
            assert httpx.post(public + "/paid").status_code == 402
            # The public listener knows nothing of the admin API: the path is proxied like any unpriced one.
            httpx.get(public + "/admin/payments")
            assert [r.path for r in recording.requests] == ["/admin/payments"]
            assert httpx.get(admin + "/admin/payments").status_code == 401
            r = httpx.get(admin + "/admin/payments", headers={"authorization": f"Bearer {READ_TOKEN}"})
            assert r.status_code == 200 and r.json() == {"payments": [], "next": None}
            assert httpx.get(admin + "/healthz", headers={"authorization": f"Bearer {READ_TOKEN}"}).status_code == 404
            # The file's reload reaches the gateway both ways: SIGHUP, and the admin API.
            config = tmp_path / "gateway.toml"
            config.write_text(config.read_text().replace('price = "0.10"', 'price = "0.20"'))
            proc.send_signal(signal.SIGHUP)
            assert _eventually_priced(admin, "200000")
            config.write_text(config.read_text().replace('price = "0.20"', 'price = "0.30"'))
            write = {"authorization": f"Bearer {WRITE_TOKEN}"}
            reloaded = httpx.post(admin + "/admin/reload", headers=write, timeout=30)
            assert reloaded.status_code == 200 and reloaded.json()["result"]["ok"] is True, reloaded.text
            assert _eventually_priced(admin, "300000")
            assert httpx.post(public + "/paid").json()["accepts"][0]["maxAmountRequired"] == "300000"
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert READ_TOKEN not in text and WRITE_TOKEN not in text
    audit = (tmp_path / "audit.jsonl").read_text()
    assert '"path":"/admin/payments"' in audit and READ_TOKEN not in audit


def test_serve_refuses_to_start_when_the_admin_port_is_taken(base_chain: DevChain, tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken, serve_asgi(RecordingUpstream()) as upstream:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin_port = taken.getsockname()[1]
        log = tmp_path / "gateway.log"
        proc = _start(_config(tmp_path, base_chain, upstream, port, admin_port), base_chain, log)
        try:
            code = proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("serve kept running with its admin port taken")
    assert code != 0
    with pytest.raises(httpx.HTTPError):  # the public listener never started either
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
