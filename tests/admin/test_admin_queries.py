"""The admin API's reads over real paid requests: payments (filters, pages), revenue, exports that read back,
pending settlements, jobs, the configuration with every secret masked, and inputs checked strictly."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from gateway.storage.ledger.export import entry_from_record, read_csv
from tests.admin.conftest import READ_TOKEN, WRITE_TOKEN, Admin, running_admin

ROUTES = [
    {"route": "POST /paid", "price": "0.10"},
    {"route": "GET /cheap", "price": "0.01"},
]


def _pay(admin: Admin, payer: LocalAccount, method: str, path: str) -> None:
    gw = admin.gateway
    with gw.client() as client:
        name, value = gw.sign(payer, client.request(method, path))
        assert client.request(method, path, headers={name: value}).status_code == 200


def test_payments_revenue_and_exports_answer_from_the_ledger(
    base_chain: DevChain, store_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, store_url, tmp_path, admin_env, routes=ROUTES) as admin:
        alice, bob = base_chain.new_payer(), base_chain.new_payer()
        start = time.time()
        for payer, method, path in [(alice, "POST", "/paid"), (alice, "GET", "/cheap"), (bob, "GET", "/cheap")]:
            _pay(admin, payer, method, path)
        with admin.client(READ_TOKEN) as api:
            everything = api.get("/admin/payments").json()
            assert [p["payer"] for p in everything["payments"]] == [
                bob.address.lower(),
                alice.address.lower(),
                alice.address.lower(),
            ]
            assert everything["next"] is None
            first = api.get("/admin/payments", params={"limit": 2}).json()
            rest = api.get("/admin/payments", params={"limit": 2, **first["next"]}).json()
            paged = [p["key"] for p in first["payments"] + rest["payments"]]
            assert paged == [p["key"] for p in everything["payments"]]
            only_alice = api.get("/admin/payments", params={"payer": alice.address.upper().replace("0X", "0x")})
            assert {p["route"] for p in only_alice.json()["payments"]} == {"POST /paid", "GET /cheap"}
            tx = everything["payments"][0]["tx_hash"]
            assert [p["key"] for p in api.get("/admin/payments", params={"tx": tx}).json()["payments"]] == [
                everything["payments"][0]["key"]
            ]
            cheap = api.get("/admin/payments", params={"route": "GET /cheap", "since": str(start)}).json()
            assert [p["usd"] for p in cheap["payments"]] == ["0.01", "0.01"]
            assert api.get("/admin/payments", params={"until": "2001-01-01"}).json()["payments"] == []

            by_route = api.get("/admin/revenue").json()
            assert {g["group"]: (g["amount"], g["payments"]) for g in by_route["groups"]} == {
                "GET /cheap": (20_000, 2),
                "POST /paid": (100_000, 1),
            }
            assert by_route["total"] == {"amount": 120_000, "usd": "0.12", "payments": 3}
            by_network = api.get("/admin/revenue", params={"by": "network"}).json()["groups"]
            assert [(g["group"], g["amount"]) for g in by_network] == [("base", 120_000)]
            assert api.get("/admin/revenue", params={"by": "day"}).json()["total"]["amount"] == 120_000

            csv = api.get("/admin/payments.csv")
            assert csv.headers["content-type"].startswith("text/csv")
            assert "attachment" in csv.headers["content-disposition"]
            from_csv = list(read_csv(io.StringIO(csv.text, newline="")))
            lines = api.get("/admin/payments.jsonl", params={"payer": alice.address}).text.splitlines()
            from_jsonl = [entry_from_record(json.loads(line)) for line in lines]
        listed = [entry_from_record(p) for p in everything["payments"]]
        assert from_csv == listed[::-1]  # exports are oldest first
        assert from_jsonl == [e for e in listed[::-1] if e.payer == alice.address.lower()]


def test_pending_jobs_and_config_answer_without_showing_a_secret(
    base_chain: DevChain, store_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, store_url, tmp_path, admin_env) as admin:
        payer = base_chain.new_payer()
        _pay(admin, payer, "POST", "/paid")
        with admin.client(READ_TOKEN) as api:
            pending = api.get("/admin/pending").json()
            jobs = api.get("/admin/jobs", params={"payer": payer.address}).json()
            config = api.get("/admin/config")
            page = api.get("/admin/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers.get_list("cache-control") == ["no-store"]
        # anvil's "finalized" block trails the head: the settlement is watched until it is final. The finality
        # tracker journals it at once and records its block at its next pass (settlement_check_interval): until then
        # it reads "unconfirmed" (not seen mined by the tracker yet).
        assert [(s["network"], s["kind"], s["status"]) for s in pending["settlements"]] in (
            [],
            [("base", "exact", "mined")],
            [("base", "exact", "unconfirmed")],
        )
        assert pending["channels"] == [] and pending["unclaimed"]["amount"] == 0
        assert jobs == {"payer": payer.address.lower(), "jobs": [], "total": 0}
        assert config.status_code == 200
        doc = config.json()
        assert doc["payment"]["relayer_key"] == "Secret($TEST_RELAYER_KEY)"
        assert [t["value"] for t in doc["admin"]["tokens"]] == ["Secret($TEST_ADMIN_READ)", "Secret($TEST_ADMIN_WRITE)"]
        assert doc["admin"]["refund_key"] == "Secret($TEST_REFUND_KEY)"
        assert [r["pattern"] for r in doc["routes"]][:1] == ["POST /paid"]
        for secret in (READ_TOKEN, WRITE_TOKEN, admin_env.key.hex()[2:], base_chain.relayer_key[2:]):
            assert secret not in config.text


def test_inputs_are_checked_strictly(
    base_chain: DevChain, store_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, store_url, tmp_path, admin_env) as admin, admin.client() as api:
        for path, params in [
            ("/admin/payments", {"payr": "0x" + "1" * 40}),  # a typo is not "every payment"
            ("/admin/payments", {"payer": "alice"}),
            ("/admin/payments", {"since": "yesterday"}),
            ("/admin/payments", {"since": "2025-02-01", "until": "2025-01-01"}),
            ("/admin/payments", {"limit": "0"}),
            ("/admin/payments", {"tx": "0x1234"}),
            ("/admin/revenue", {"by": "payer"}),
            ("/admin/jobs", {}),
        ]:
            r = api.get(path, params=params)
            assert r.status_code == 400, (path, params, r.text)
            assert r.json()["error"] == "bad_request"
        for path, body in [
            ("/admin/deny", {"payer": "0x12"}),
            ("/admin/deny", {"payer": "0x" + "1" * 40, "reason": "typo of note"}),
            ("/admin/routes/price", {"route": "GET /cheap", "price": 0.25}),  # never a float
            ("/admin/routes/pause", {"route": "GET /cheap", "paused": "yes"}),
        ]:
            r = api.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
        assert api.post("/admin/deny", content=b"[1, 2]").status_code == 400
        assert api.post("/admin/deny", content=b"{not json").status_code == 400
        assert api.put("/admin/deny").status_code == 405
        assert api.get("/admin/deny").json() == {"denied": []}
