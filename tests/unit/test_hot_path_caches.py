"""The per-request shortcuts of the free path keep the guarantees of the slow path they replace."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from gateway.http.context import new_request_id
from gateway.jobs import layer as layer_module
from gateway.jobs.api import Kind, Match
from gateway.jobs.auth import payer_auth_message
from gateway.jobs.layer import JobsLayer, _Expiring
from gateway.ops.events import RequestRecord
from gateway.ops.logs import REDACTOR, AccessLog, JsonFormatter


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
