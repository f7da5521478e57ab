"""Admin API access: no token or a wrong one is 401, a read-only token acting is 403, and neither changes anything;
every call, refused ones too, is in the audit log, which never holds a token."""

from __future__ import annotations

from pathlib import Path

import httpx
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from tests.admin.conftest import READ_TOKEN, WRITE_TOKEN, running_admin
from tests.support.gateway import sqlite_url

PAYER = "0x" + "ab" * 20
WRONG = "wrong-token-" + "x" * 24
CALLS: list[tuple[str, str, dict[str, object] | None]] = [
    ("GET", "/admin/payments", None),
    ("GET", "/admin/config", None),
    ("GET", "/admin/store", None),
    ("GET", "/admin/deny", None),
    ("POST", "/admin/deny", {"payer": PAYER}),
    ("DELETE", f"/admin/deny/{PAYER}", None),
    ("POST", "/admin/refund", {"key": "exact:8453:0x:0x:0x"}),
    ("POST", "/admin/routes/price", {"route": "GET /cheap", "price": "9.99"}),
    ("POST", "/admin/reload", None),
    ("GET", "/admin/no-such-call", None),
]


def _call(client: httpx.Client, method: str, path: str, body: dict[str, object] | None) -> httpx.Response:
    return client.request(method, path, json=body) if body is not None else client.request(method, path)


def test_no_token_or_a_wrong_token_is_refused_everywhere_and_changes_nothing(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        for headers in ({}, {"authorization": f"Bearer {WRONG}"}, {"authorization": WRITE_TOKEN}):
            with httpx.Client(base_url=admin.url, headers=headers) as client:
                for method, path, body in CALLS:
                    r = _call(client, method, path, body)
                    assert r.status_code == 401, (method, path, r.text)
                    assert r.json()["error"] == "admin_token_required"
                    assert r.headers["www-authenticate"].startswith("Bearer")
                    assert r.headers["cache-control"] == "no-store"
                    assert "access-control-allow-origin" not in r.headers
        with admin.client(READ_TOKEN) as client:
            assert client.get("/admin/deny").json() == {"denied": []}
            routes = {r["route"]: r["price"] for r in client.get("/admin/routes").json()["routes"]}
        assert routes["GET /cheap"] == "10000"  # the price change was never applied


def test_a_read_only_token_reads_and_is_refused_every_action(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        with admin.client(READ_TOKEN) as client:
            for method, path, body in CALLS:
                r = _call(client, method, path, body)
                if method == "GET":
                    expected = 404 if path == "/admin/no-such-call" else 200
                    assert r.status_code == expected, (path, r.text)
                else:
                    assert r.status_code == 403, (method, path, r.text)
                    assert r.json()["error"] == "admin_token_read_only"
            assert client.get("/admin/deny").json() == {"denied": []}
            routes = {r["route"]: r for r in client.get("/admin/routes").json()["routes"]}
        assert routes["GET /cheap"]["price"] == "10000" and routes["GET /cheap"]["override"] is None
        with admin.client(WRITE_TOKEN) as client:  # the same call with a write token does act
            assert client.post("/admin/deny", json={"payer": PAYER}).json()["added"] is True
            assert [d["payer"] for d in client.get("/admin/deny").json()["denied"]] == [PAYER]


def test_every_call_is_in_the_audit_log_and_no_token_is(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        sent: list[tuple[str | None, str, str, int]] = []
        for token in (None, WRONG, READ_TOKEN, WRITE_TOKEN):
            with httpx.Client(
                base_url=admin.url, headers={"authorization": f"Bearer {token}"} if token else {}
            ) as client:
                for method, path, body in CALLS:
                    r = _call(client, method, path, body)
                    name = {READ_TOKEN: "TEST_ADMIN_READ", WRITE_TOKEN: "TEST_ADMIN_WRITE"}.get(token or "")
                    sent.append((name, method, path, r.status_code))
        # A token pasted into an argument is not written either.
        with admin.client(WRITE_TOKEN) as client:
            r = client.post("/admin/deny", json={"payer": PAYER, "note": f"token {READ_TOKEN} leaked"})
            assert r.status_code == 200
        text = admin.audit_log.read_text()
        lines = admin.audit()
    for secret in (READ_TOKEN, WRITE_TOKEN, WRONG, admin_env.key.hex().removeprefix("0x")):
        assert secret not in text
    calls = [line for line in lines if "method" in line]
    assert [(c["token"], c["method"], c["path"], c["status"]) for c in calls[: len(sent)]] == sent
    assert all(c["time"].endswith("Z") and c["client"] == "127.0.0.1" for c in calls)
    actions = [c for c in calls if c["method"] != "GET" and c["status"] == 200]
    assert actions and all("args" in c for c in actions)
    assert actions[0]["args"] == {"payer": PAYER, "note": ""}
    assert calls[-1]["args"]["payer"] == PAYER and READ_TOKEN not in calls[-1]["args"]["note"]
    refused = [c for c in calls if c["status"] == 403]
    with_body = {path for _, path, body in CALLS if body}
    assert refused and all(c["args"] for c in refused if c["path"] in with_body)  # what a read token tried


def test_the_store_topology_with_its_address_is_for_admin_tokens_only(
    base_chain: DevChain, redis_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, redis_url, tmp_path, admin_env) as admin:
        with admin.client(READ_TOKEN) as client:
            topology = client.get("/admin/store").json()
        assert topology["topology"] == "server" and topology["failovers_seen"] == 0
        assert "master" in topology  # a Sentinel master's address; none for one server
        with httpx.Client(base_url=admin.url) as client:
            assert client.get("/admin/store").status_code == 401
