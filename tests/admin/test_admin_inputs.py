"""Malformed admin inputs are refused with a 400 and a machine-readable reason, never acted on in another sense than
asked, never a 500 (docs/operating.md, "Admin API": "Answers and errors").

Each test sends what a typo, a script bug or a hostile write-token holder could send, and checks both the answer and
that nothing changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from tests.admin.conftest import running_admin
from tests.support.gateway import sqlite_url

PAYER = "0x" + "ab" * 20


def test_a_valid_json_string_that_no_store_can_encode_is_a_bad_request(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """``"\\ud800"`` is valid JSON but no Unicode character: a store encoding it as UTF-8 raised, and the action
    answered 500 ``internal_error`` (with a traceback in the log) instead of saying what was wrong."""
    lone = "\\ud800"  # the six characters of the JSON escape
    bodies = {
        "/admin/deny": '{"payer": "' + PAYER + '", "note": "' + lone + '"}',
        "/admin/refund": '{"key": "exact:8453:' + lone + '"}',
    }
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin, admin.client() as api:
        answers = {path: api.post(path, content=body) for path, body in bodies.items()}
        denied = api.get("/admin/deny").json()["denied"]
    seen = {path: (r.status_code, r.json()["error"]) for path, r in answers.items()}
    assert seen == {path: (400, "bad_request") for path in bodies}
    assert denied == []


def test_a_price_beyond_what_a_decimal_can_hold_is_a_bad_request(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """``"1e999999999999"`` is a decimal string whose exponent overflows ``Decimal`` (``decimal.Overflow``, not a
    ``ValueError``): it answered 500 ``internal_error``."""
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin, admin.client() as api:
        answers = [
            api.post("/admin/routes/price", json={"route": "GET /cheap", "price": price})
            for price in ("1e999999999999", "1E+999999", "-1e999999999999")
        ]
        routes = {r["route"]: r for r in api.get("/admin/routes").json()["routes"]}
    assert [(r.status_code, r.json()["error"]) for r in answers] == [(400, "bad_request")] * 3
    assert routes["GET /cheap"]["price"] == "10000" and routes["GET /cheap"]["override"] is None


def test_a_time_that_is_not_a_finite_number_is_a_bad_request(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """``since=nan`` (or ``inf``) parsed as a float: the query matched nothing and said so with 200, and the revenue
    answer echoed ``NaN`` / ``Infinity``, which is not JSON (a strict parser, ``jq`` or a browser, refuses the whole
    answer)."""
    queries = ["/admin/payments?since=nan", "/admin/revenue?until=inf", "/admin/payments.csv?since=-inf"]
    queries += ["/admin/payments?before=nan&before_key=x", "/admin/revenue?since=1e400"]
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin, admin.client() as api:
        answers = {q: api.get(q) for q in queries}
    for answer in answers.values():
        json.loads(answer.text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict JSON
    assert {q: (r.status_code, r.json()["error"]) for q, r in answers.items()} == {
        q: (400, "bad_request") for q in queries
    }


def test_a_resume_asked_in_the_query_never_pauses_the_route(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """Action arguments are read from the query or the JSON body, but ``paused`` only from the body, defaulting to
    true: ``POST /admin/routes/pause?route=GET /cheap&paused=false`` (resume it) paused the route."""
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin, admin.client() as api:
        answer = api.post("/admin/routes/pause", params={"route": "GET /cheap", "paused": "false"})
        routes = {r["route"]: r for r in api.get("/admin/routes").json()["routes"]}
    assert (answer.status_code, answer.json()["error"]) == (400, "bad_request")
    assert routes["GET /cheap"]["paused"] is False


def test_an_argument_given_twice_is_refused_rather_than_one_of_them_acted_on(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """With ``route`` in both the query and the body, the query's silently won: the caller (and the reviewer of the
    request, who reads the body) believed another route was changed."""
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin, admin.client() as api:
        answer = api.post(
            "/admin/routes/pause", params={"route": "GET /cheap"}, json={"route": "GET /dear", "paused": True}
        )
        routes = {r["route"]: r["paused"] for r in api.get("/admin/routes").json()["routes"]}
    assert (answer.status_code, answer.json()["error"]) == (400, "bad_request")
    assert not any(routes.values()), routes


def test_a_page_whose_name_was_rebound_to_the_admin_address_can_neither_read_nor_act(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """DNS rebinding: a page at ``http://evil.example:<admin port>`` whose name is then made to resolve to 127.0.0.1
    sends its requests to the admin listener, and the browser treats them as same-origin (``Sec-Fetch-Site:
    same-origin``, ``Origin`` equal to ``Host``): the cross-site check let them act, and the page could read every
    answer (the configuration, the exports). With the token in the browser (a header extension not limited to the
    admin origin sends it everywhere, so every site has seen it), that is the whole admin API for any web page.
    The same calls from ``localhost`` or the IP address, and from a script under any name, are answered."""
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin, admin.client() as api:
        port = admin.url.rsplit(":", 1)[1]
        rebound = {"host": f"evil.example:{port}", "sec-fetch-site": "same-origin", "sec-fetch-mode": "cors"}
        read = api.get("/admin/config", headers=rebound)
        act = api.post(
            "/admin/deny", json={"payer": PAYER}, headers={**rebound, "origin": f"http://evil.example:{port}"}
        )
        own = {"sec-fetch-site": "same-origin", "sec-fetch-mode": "navigate"}
        dashboard = {h: api.get("/admin/", headers={**own, "host": f"{h}:{port}"}) for h in ("localhost", "127.0.0.1")}
        script = api.get("/admin/routes", headers={"host": f"admin.internal:{port}"})  # no browser headers
        # Node's fetch (undici) sends Sec-Fetch-Mode on every request, and no Sec-Fetch-Site: a script, not a page.
        node = api.get("/admin/routes", headers={"host": f"gateway:{port}", "sec-fetch-mode": "cors"})
        denied = api.get("/admin/deny").json()["denied"]
    assert [(r.status_code, r.json()["error"]) for r in (read, act)] == [(400, "invalid_host")] * 2
    assert denied == []
    assert {h: r.status_code for h, r in dashboard.items()} == {"localhost": 200, "127.0.0.1": 200}
    assert script.status_code == 200
    assert node.status_code == 200


def test_a_browser_may_use_a_name_the_operator_listed_and_no_other(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """Behind a reverse proxy or tunnel the dashboard is opened under the operator's own name: listed in
    ``[admin] browser_hosts``, it is answered; a name not listed is still refused as a rebinding."""
    with (
        running_admin(
            base_chain, sqlite_url(tmp_path), tmp_path, admin_env, admin={"browser_hosts": ["Admin.Example."]}
        ) as admin,
        admin.client() as api,
    ):
        port = admin.url.rsplit(":", 1)[1]
        browser = {"sec-fetch-site": "same-origin", "sec-fetch-mode": "navigate"}
        listed = api.get("/admin/", headers={**browser, "host": f"admin.example:{port}"})
        other = api.get("/admin/", headers={**browser, "host": f"evil.example:{port}"})
    assert listed.status_code == 200
    assert (other.status_code, other.json()["error"]) == (400, "invalid_host")
