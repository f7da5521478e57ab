"""``x402-gateway admin ...``: the admin API from a terminal, ``--json`` for scripts, and exit codes like the client
commands' (0 done, 1 refused at run time, 2 usage or configuration)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount

from gateway.cli import main
from gateway.dev.chain import DevChain
from gateway.storage.ledger.export import read_csv
from tests.admin.conftest import READ_TOKEN, WRITE_TOKEN, Admin, running_admin
from tests.support.gateway import sqlite_url

PRICE = 100_000


def admin_cli(
    capsys: pytest.CaptureFixture[str], admin: Admin, *args: str, token_env: str = "TEST_ADMIN_WRITE"
) -> tuple[int, str, str]:
    code = main(["admin", *args, "--url", admin.url, "--token-env", token_env])
    out, err = capsys.readouterr()
    return code, out, err


def as_json(capsys: pytest.CaptureFixture[str], admin: Admin, *args: str, **kw: Any) -> tuple[int, Any]:
    code, out, err = admin_cli(capsys, admin, *args, "--json", **kw)
    assert out, err
    return code, json.loads(out)


def test_the_admin_commands_print_the_apis_json_for_scripts_and_tables_for_people(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount, capsys: pytest.CaptureFixture[str]
) -> None:
    base_chain.mint(admin_env.address, PRICE)
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        gw = admin.gateway
        payer = base_chain.new_payer(PRICE)
        with gw.client() as client:
            name, value = gw.sign(payer, client.post("/paid"))
            assert client.post("/paid", headers={name: value}).status_code == 200
        with admin.client(READ_TOKEN) as api:
            expected = api.get("/admin/payments").json()

        code, doc = as_json(capsys, admin, "payments", "--payer", payer.address, token_env="TEST_ADMIN_READ")
        assert (code, doc) == (0, expected)
        key = doc["payments"][0]["key"]
        code, out, _ = admin_cli(capsys, admin, "payments")
        assert code == 0 and "USD" in out.splitlines()[0] and key in out and "0.10" in out

        code, doc = as_json(capsys, admin, "revenue", "--by", "route")
        assert code == 0 and doc["total"] == {"amount": PRICE, "usd": "0.10", "payments": 1}
        code, doc = as_json(capsys, admin, "pending")
        assert code == 0 and set(doc) == {"settlements", "channels", "unclaimed"}

        output = tmp_path / "payments.csv"
        code, _, _ = admin_cli(capsys, admin, "export", "--output", str(output))
        assert code == 0 and [e.key for e in read_csv(output.open(newline=""))] == [key]

        code, doc = as_json(capsys, admin, "deny", "add", payer.address, "--note", "test")
        assert code == 0 and doc == {"payer": payer.address.lower(), "denied": True, "added": True}
        code, doc = as_json(capsys, admin, "deny", "list")
        assert code == 0 and [d["payer"] for d in doc["denied"]] == [payer.address.lower()]
        code, doc = as_json(capsys, admin, "deny", "remove", payer.address)
        assert code == 0 and doc["removed"] is True

        code, doc = as_json(capsys, admin, "refund", key)
        assert code == 0 and doc["sent"] is True and doc["refund"]["amount"] == -PRICE
        code, doc = as_json(capsys, admin, "refund", key)  # refunded before: nothing sent, exit 1
        assert code == 1 and doc["error"] == "payment_already_refunded"
        assert base_chain.balance(payer.address) == PRICE

        code, doc = as_json(capsys, admin, "price", "GET /cheap", "0.02")
        assert code == 0 and doc["state"]["price"] == "20000"
        with gw.client() as client:
            assert client.get("/cheap").json()["accepts"][0]["maxAmountRequired"] == "20000"
        code, out, _ = admin_cli(capsys, admin, "price", "GET /cheap", "file")
        assert code == 0 and out.strip() == "GET /cheap: $0.01"
        code, doc = as_json(capsys, admin, "pause", "GET /cheap")
        assert code == 0 and doc["state"]["paused"] is True
        with gw.client() as client:
            paused = client.get("/cheap")
            assert paused.status_code == 503 and paused.json()["error"] == "route_paused"
        code, doc = as_json(capsys, admin, "pause", "GET /cheap", "--resume")
        assert code == 0 and doc["state"]["paused"] is False
        with gw.client() as client:
            assert client.get("/cheap").status_code == 402
    # Every command above is in the audit log, under the token it used.
    calls = [(c["token"], c["method"], c["path"]) for c in admin.audit() if "method" in c]
    assert ("TEST_ADMIN_READ", "GET", "/admin/payments") in calls
    assert ("TEST_ADMIN_WRITE", "POST", "/admin/routes/pause") in calls


def test_admin_command_exit_codes(
    base_chain: DevChain,
    tmp_path: Path,
    admin_env: LocalAccount,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        code, _, err = admin_cli(capsys, admin, "payments", token_env="NO_SUCH_VARIABLE")
        assert code == 2 and "NO_SUCH_VARIABLE" in err
        monkeypatch.setenv("WRONG_ADMIN_TOKEN", "x" * 32)
        code, _, err = admin_cli(capsys, admin, "payments", token_env="WRONG_ADMIN_TOKEN")
        assert code == 2 and "admin_token_required" in err
        code, _, err = admin_cli(capsys, admin, "deny", "add", "0x" + "1" * 40, token_env="TEST_ADMIN_READ")
        assert code == 2 and "admin_token_read_only" in err
        code, _, err = admin_cli(capsys, admin, "deny", "add", "not-an-address")
        assert code == 2 and "bad_request" in err
        code, _, err = admin_cli(capsys, admin, "refund", "exact:8453:nothing")
        assert code == 1 and "payment_not_found" in err
        code, _, err = admin_cli(capsys, admin, "reload")  # started without a config file: nothing to reload
        assert code == 2 and "invalid_config" in err
        for secret in (READ_TOKEN, WRITE_TOKEN, "x" * 32):
            assert secret not in err
    with httpx.Client() as probe, pytest.raises(httpx.HTTPError):  # nothing listens there any more
        probe.get(admin.url, timeout=1)
    code, _, err = admin_cli(capsys, admin, "payments")
    assert code == 1 and "cannot reach" in err
