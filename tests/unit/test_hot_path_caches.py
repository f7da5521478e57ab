"""The per-request shortcuts of the free path keep the guarantees of the slow path they replace."""

from __future__ import annotations

import io
import json
import logging
import random
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, unquote

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from gateway import routes as routes_module
from gateway.errors import BadRequest
from gateway.http import forwarding
from gateway.http import proxy as proxy_module
from gateway.http.context import new_request_id
from gateway.http.forwarding import upstream_path
from gateway.http.proxy import _lease, client_key
from gateway.jobs import layer as layer_module
from gateway.jobs.api import Kind, Match
from gateway.jobs.auth import payer_auth_message
from gateway.jobs.layer import JobsLayer, _Expiring
from gateway.ops.events import RequestRecord
from gateway.ops.logs import REDACTOR, AccessLog, JsonFormatter
from gateway.routes import AmbiguousPath, RoutePattern, RouteTable


def _signed(account: Any, method: str, path: str, ts: int) -> bytes:
    sig = account.sign_message(encode_defunct(text=payer_auth_message(method, path, ts))).signature.hex()
    return f"{ts}.{sig if sig.startswith('0x') else '0x' + sig}".encode()


def _layer(skew: int = 300) -> JobsLayer:
    config = SimpleNamespace(routes=None, token_header="X-Job-Token", auth_max_skew_seconds=skew)
    return JobsLayer(config, store=None)  # type: ignore[arg-type]


def test_a_cached_payer_signature_lapses_exactly_when_the_header_goes_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    account = Account.create()
    now = 1_800_000_000
    path = "/agent/job/abc"
    value = _signed(account, "GET", path, now)
    layer = _layer(skew=300)
    match = Match(Kind.STATUS, "abc", path)
    scope = {"method": "GET", "headers": [(b"x-payer-auth", value)]}
    monkeypatch.setattr(layer_module.time, "time", lambda: now)
    assert layer.payer_proof(scope, match) == account.address.lower()
    assert len(layer._signers) == 1
    monkeypatch.setattr(layer_module.time, "time", lambda: now + 300)
    assert layer.payer_proof(scope, match) == account.address.lower()  # from the cache, still fresh
    monkeypatch.setattr(layer_module.time, "time", lambda: now + 301)
    assert layer.payer_proof(scope, match) is None  # stale: the cache answers as verify_payer_auth would
    other = Match(Kind.STATUS, "abd", "/agent/job/abd")
    monkeypatch.setattr(layer_module.time, "time", lambda: now)
    # Signed for another path or method: never a hit (recovery yields some other address, as without the cache).
    assert layer.payer_proof(scope, other) != account.address.lower()
    assert layer.payer_proof({"method": "DELETE", "headers": scope["headers"]}, match) != account.address.lower()


def test_the_expiring_map_is_bounded_and_honours_deadlines() -> None:
    cache = _Expiring(2)
    cache.put("a", 1, until=10)
    cache.put("b", 2, until=10)
    cache.put("c", 3, until=10)
    assert len(cache) == 2 and cache.get("a", 0) is None and cache.get("c", 0) == 3
    assert cache.get("b", 11) is None


def test_access_lines_are_valid_json_redacted_and_unique() -> None:
    handle = REDACTOR.add(["s3cr3t-api-key-value"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(REDACTOR)
    logger = logging.getLogger("gateway.access.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        record = RequestRecord(request_id=new_request_id(), method="GET", path="/x/s3cr3t-api-key-value", client="::1")
        record.status = 200
        AccessLog(logger).request_done(record)
    finally:
        logger.removeHandler(handler)
        REDACTOR.remove(handle)
    line = json.loads(stream.getvalue())
    assert "s3cr3t-api-key-value" not in stream.getvalue()
    assert line["logger"] == "gateway.access.test" and line["level"] == "info" and line["status"] == 200
    assert line["path"] == "/x/***" and line["message"] == "GET /x/*** 200 free"
    assert line["time"].endswith("Z")
    assert len({new_request_id() for _ in range(1000)}) == 1000
    assert len(new_request_id()) == 32


def test_settlement_gas_is_estimated_first_then_assumed_but_estimated_again_periodically_and_after_a_revert() -> None:
    from gateway.chain.gas import GasBook

    book = GasBook(refresh_every=4)
    assert book.hint() is None  # nothing learned: estimate
    book.learn(61_000)
    assert [book.hint() for _ in range(3)] == [61_000, 61_000, None]  # every 4th call estimates again
    book.learn(58_000)  # a cheaper estimate never lowers the limit
    book.learn(84_000)  # a dearer one raises it
    assert book.hint() == 84_000
    book.forget()  # one of our settlements reverted: maybe the limit was too low
    assert book.hint() is None


def test_a_route_tables_remembered_answers_are_the_answers_it_would_compute() -> None:
    table = RouteTable(
        [
            (RoutePattern.parse("GET /items/{id}"), "item"),
            (RoutePattern.parse("POST /paid"), "paid"),
            (RoutePattern.parse("GET /a%2Fb/**"), "a"),
        ]
    )
    fresh = RouteTable(table._entries)
    paths = ["/items/7", "/items/7/", "/paid", "/PAID", "/free", "/items/%2e%2e/paid", "/a%2Fb/x", "/items/a%2Fb"]
    paths += ["/items/\u00e9", "/x/%ZZ", "/x%00", "/" + "p" * 300]
    for _ in range(3):  # the first round computes, the next ones are answered from memory
        for method in ("GET", "POST", "HEAD"):
            for path in paths:
                try:
                    expected: object = fresh._match_request(method, path)
                except AmbiguousPath as exc:
                    expected = ("ambiguous", str(exc))
                try:
                    got: object = table.match_request(method, path)
                except AmbiguousPath as exc:
                    got = ("ambiguous", str(exc))
                assert got == expected, (method, path)
    answer = table.match_request("GET", "/items/7")
    assert answer is not None
    answer[1]["id"] = "changed by a caller"
    assert table.match_request("GET", "/items/7") == ("item", {"id": "7"})  # each caller gets its own values


def test_a_route_tables_memory_is_bounded_whatever_paths_clients_send() -> None:
    table = RouteTable([(RoutePattern.parse("POST /paid"), "paid")])
    for i in range(routes_module._CACHED_ANSWERS * 3):
        assert table.match_request("GET", f"/free/{i}") is None
        assert len(table._answers) <= routes_module._CACHED_ANSWERS
    assert table.match_request("GET", "/" + "x" * (routes_module._CACHED_PATH_LENGTH + 1)) is None
    assert all(len(path) <= routes_module._CACHED_PATH_LENGTH for _, path in table._answers)


def _resolved_the_long_way(base: str, raw_path: str) -> str:
    """upstream_path without its shortcut for plain paths (the full resolution, as it reads in forwarding.py)."""
    out: list[str] = []
    trailing = ""
    for seg in quote(raw_path, safe=forwarding._PATH_SAFE).split("/"):
        decoded = unquote(seg) if "%" in seg else seg
        trailing = "/" if not seg or decoded in (".", "..") else ""
        if decoded in (".", ".."):
            if decoded == ".." and out:
                out.pop()
        elif "%" in seg and ".." in decoded.replace("\\", "/").split("/"):
            return "refused"
        elif seg:
            out.append(seg)
    if not out:
        return base.rstrip("/") + "/"
    return f"{base.rstrip('/')}/{'/'.join(out)}{trailing}"


def test_the_upstream_path_shortcut_for_plain_paths_resolves_exactly_like_the_full_rules() -> None:
    rng = random.Random(11)
    alphabet = "/ab.%2e_~-:@!$&'()*+,;=\u00e9#?\\ 0Z"
    paths = ["/", "//", "/a", "/a/", "/a//b", "/./a", "/a/..", "/.well-known/x", "/a.b/c..d", "a/b", ""]
    paths += [
        "/" * rng.randint(0, 1) + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        for _ in range(50_000)
    ]
    for base in ("", "/", "/api", "/api/"):
        for path in paths:
            try:
                got = upstream_path(base, path)
            except BadRequest:
                got = "refused"
            assert got == _resolved_the_long_way(base, path), (base, path)


def test_client_keys_are_remembered_as_computed_and_the_memory_is_bounded() -> None:
    cases = {
        "127.0.0.1": "ip:127.0.0.1",
        "::ffff:10.1.2.3": "ip:10.1.2.3",  # an IPv4 client seen through an IPv6 socket counts as itself
        "2001:db8:1:2:3:4:5:6": "ip:2001:db8:1:2::/64",  # one host's /64 is one client
        "2001:db8:1:2:ffff::1": "ip:2001:db8:1:2::/64",
        "not an address": "ip:not an address",
    }
    for _ in range(2):
        for address, key in cases.items():
            assert _lease({"client": (address, 1)}).client == key
            assert client_key(address) == key
    assert _lease({"client": ("127.0.0.1", 1), "state": {"x402": {"payer": "0xAbC"}}}).client == "payer:0xabc"
    assert _lease({}).client is None
    for i in range(proxy_module._CLIENT_KEYS_KEPT * 2):
        _lease({"client": (f"10.0.{i // 256 % 256}.{i % 256}", 1)})
        assert len(proxy_module._CLIENT_KEYS) <= proxy_module._CLIENT_KEYS_KEPT
