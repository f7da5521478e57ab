"""Fuzz: malformed payment headers never crash the gateway, never reach the upstream (docs/threat-model.md T21).

Several hundred hand-picked and seeded-random mutations of a real payment, sent in both header names
(``X-PAYMENT`` and ``PAYMENT-SIGNATURE``): each answer is a 400 or a 402 carrying a non-empty machine-readable
``error`` (a 402 also the full challenge; a 20 KB header may meet the server's 431 header cap first), never a
5xx, and the upstream sees nothing.

The template payment is genuinely signed by a payer holding no USDC, so a mutation that stays valid (hex case,
key order, number as JSON integer) gets as far as the chain and is refused there (402 insufficient balance)
instead of being served.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain
from tests.e2e import craft
from tests.e2e.helpers import b64json
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url

SEED = 402_2025
HEADERS = ("X-PAYMENT", "PAYMENT-SIGNATURE")
UINT256_MAX = 2**256 - 1
# Re-spellings of the genuine template that must decode to the very same payment.
STILL_VALID = frozenset(
    {
        "uppercase hex",
        "mixed-case signature",
        "numbers as JSON integers",
        "reversed keys",
        "no padding",
        "url-safe alphabet",
        "pretty JSON",
    }
)


@pytest.fixture(scope="module")
def gw(base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path_factory.mktemp("fuzz"))) as gw:
        yield gw


def templates(gw: GatewayUnderTest, base_chain: DevChain) -> tuple[dict[str, Any], dict[str, Any]]:
    """A genuine v1 and v2 payment document for POST /paid by a payer without funds."""
    payer = base_chain.new_payer(0)
    challenge = httpx.post(gw.url + "/paid")
    req = gw.options(challenge)[0].requirement
    auth = craft.authorization(payer.address, gw.pay_to, 100_000, now=int(time.time()))
    sig = craft.sign_for(payer, auth, base_chain)
    return craft.v1_envelope(auth, sig), craft.v2_envelope(auth, sig, accepted=req)


def leaf_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into ``doc`` (objects and their members), depth first."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield (*prefix, key)
            yield from leaf_paths(value, (*prefix, key))


def with_value(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    out = copy.deepcopy(doc)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def without(doc: Any, path: tuple[Any, ...]) -> Any:
    out = copy.deepcopy(doc)
    target = out
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return out


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def js(doc: Any) -> bytes:
    try:
        return b64(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode())
    except UnicodeEncodeError:  # a lone surrogate: only the \\uXXXX escape can carry it
        return b64(json.dumps(doc, separators=(",", ":")).encode())


WRONG_TYPES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    100000.0,
    1e400,  # json.dumps writes Infinity, which Python's json.loads accepts back
    float("nan"),
    "",
    "x",
    [],
    ["0x00"],
    {},
    {"nested": {"deeper": [1, 2, 3]}},
    2**256,
    -(2**255),
]

NUMERIC_EDGES: list[Any] = [
    "1" + "0" * 80,
    str(2**256),
    str(UINT256_MAX),
    "-1",
    "+1",
    " 100000",
    "100000 ",
    "1e5",
    "0x186a0",
    "100000.0",
    "\uff11\uff10\uff10",  # fullwidth "100": int() would take it, a strict parser must not
    "\u0663",  # Arabic-Indic digit three
    "00000000000000000000000000000000000000000000000000000000000000000000000000000100000",
    "\u0000100000",
    2**256,
    UINT256_MAX,
    -100000,
    100000.5,
]

BAD_HEX: list[str] = [
    "",
    "0x",
    "0x" + "0" * 63,
    "0x" + "0" * 65,
    "0x" + "g" * 64,
    "0" * 64,
    "0X" + "0" * 64,
    "0x" + "0" * 39,
    "0x" + "0" * 41,
    "0x" + "f" * 40,
    "0x" + "a" * 129,
    "0x" + "ab" * 63,  # 63 bytes
    "0x" + "ab" * 4097,  # over the signature cap
    " 0x" + "0" * 64,
    "0x" + "0" * 62 + "\u0000\u0000",
    "0x" + "é" * 64,
]


def structured_cases(v1: dict[str, Any], v2: dict[str, Any], rng: random.Random) -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = []
    for name, doc in (("v1", v1), ("v2", v2)):
        paths = list(leaf_paths(doc))
        for path in paths:
            dotted = ".".join(map(str, path))
            cases.append((f"{name} missing {dotted}", js(without(doc, path))))
            for i, bad in enumerate(WRONG_TYPES):
                if rng.random() < 0.6 or path[-1] in ("value", "validBefore", "nonce", "signature", "x402Version"):
                    cases.append((f"{name} {dotted} wrong type #{i}", js(with_value(doc, path, bad))))
        auth_path = ("payload", "authorization")
        for field in ("value", "validAfter", "validBefore"):
            for i, bad in enumerate(NUMERIC_EDGES):
                cases.append((f"{name} {field} numeric edge #{i}", js(with_value(doc, (*auth_path, field), bad))))
        for field in ("from", "to", "nonce"):
            for i, bad in enumerate(BAD_HEX):
                cases.append((f"{name} {field} bad hex #{i}", js(with_value(doc, (*auth_path, field), bad))))
        for i, bad in enumerate(BAD_HEX):
            cases.append((f"{name} signature bad hex #{i}", js(with_value(doc, ("payload", "signature"), bad))))
        # Still-valid spellings: they must reach the chain checks (402), never a 400 or a 5xx.
        auth = doc["payload"]["authorization"]
        upper = {**auth, "from": craft.upper_hex(auth["from"]), "to": craft.upper_hex(auth["to"])}
        upper["nonce"] = craft.upper_hex(auth["nonce"])
        cases.append((f"{name} uppercase hex", js(with_value(doc, auth_path, upper))))
        mixed = "".join(c.upper() if rng.random() < 0.5 else c for c in doc["payload"]["signature"][2:])
        cases.append((f"{name} mixed-case signature", js(with_value(doc, ("payload", "signature"), "0x" + mixed))))
        as_ints = {**auth, "value": int(auth["value"]), "validBefore": int(auth["validBefore"])}
        cases.append((f"{name} numbers as JSON integers", js(with_value(doc, auth_path, as_ints))))
        cases.append((f"{name} reversed keys", js(craft.reversed_keys(doc))))
        cases.append((f"{name} no padding", js(doc).rstrip(b"=")))
        cases.append((f"{name} url-safe alphabet", base64.urlsafe_b64encode(json.dumps(doc).encode())))
        cases.append((f"{name} pretty JSON", b64(json.dumps(doc, indent=4).encode())))
        # Unicode and NUL bytes inside JSON strings.
        for i, text in enumerate(["bäse", "\u212fxact", "base\u0000", "\u0000", "💸" * 50, "\ud800", "e\u0301xact"]):
            key = ("network",) if name == "v1" else ("accepted", "network")
            cases.append((f"{name} unicode network #{i}", js(with_value(doc, key, text))))
            key = ("scheme",) if name == "v1" else ("accepted", "scheme")
            cases.append((f"{name} unicode scheme #{i}", js(with_value(doc, key, text))))
        cases.append((f"{name} NUL in nonce", js(with_value(doc, (*auth_path, "nonce"), auth["nonce"] + "\u0000"))))
        # Big documents: padded to 20 KB, and nested deep enough to exhaust a recursive parser.
        cases.append((f"{name} 20 KB document", js({**doc, "padding": "A" * 20_000})))
        cases.append((f"{name} deep nesting", js({**doc, "extensions": json.loads("[" * 5000 + "]" * 5000)})))
        cases.append((f"{name} payload is a list", js({**doc, "payload": [doc["payload"]]})))
        cases.append((f"{name} authorization is a string", js(with_value(doc, auth_path, json.dumps(auth)))))
        cases.append((f"{name} permit2 payload", js({**doc, "payload": {"permit2Authorization": {}}})))
        # Random multi-field mutations.
        for i in range(40):
            mutated = doc
            for _ in range(rng.randint(1, 3)):
                path = rng.choice(list(leaf_paths(mutated)))
                if rng.random() < 0.3:
                    mutated = without(mutated, path)
                else:
                    mutated = with_value(mutated, path, rng.choice(WRONG_TYPES + NUMERIC_EDGES + BAD_HEX))
            cases.append((f"{name} random mutation #{i}", js(mutated)))
    return cases


def raw_cases(rng: random.Random) -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = []
    printable = "".join(chr(c) for c in range(0x21, 0x7F))
    for i in range(40):
        n = rng.randint(1, 300)
        cases.append((f"random printable #{i}", "".join(rng.choice(printable) for _ in range(n)).encode()))
    for i in range(30):
        cases.append((f"base64 of random bytes #{i}", b64(rng.randbytes(rng.randint(1, 400)))))
    for i in range(10):
        cases.append(
            (
                f"base64 of random UTF-8 text #{i}",
                b64("".join(chr(rng.randint(32, 0x2FFF)) for _ in range(50)).encode()),
            )
        )
    not_objects = [
        "[]", "[1,2,3]", '["x402Version",1]', '"a string"', "42", "-1", "1e999", "3.14", "null", "true", "false",
        '{"x402Version":1', "{}", '{"x402Version":"1"}', '{"x402Version":1.5}', '{"x402Version":true}',
        '{"x402Version":null}', '{"x402Version":[1]}', '{"x402Version":1}', '{"x402Version":2}',
        '{"x402Version":2,"accepted":null}', '{"x402Version":1,"scheme":"exact","network":"base"}',
        '{"x402Version":1,"scheme":"exact","network":"base","payload":{}}', "NaN", "Infinity", '"\\u0000"',
        "\ufeff{}",
    ]  # fmt: skip
    for text in not_objects:
        cases.append((f"JSON {text[:30]!r}", b64(text.encode())))
    for text in ["", "=", "====", "A", "AB", "ABC", "A===", "!!!!", "e30", "e30=", "e30==", "e30===",
                 "e 3 0 =", "%7B%7D", "data:application/json;base64,e30="]:  # fmt: skip
        cases.append((f"raw {text!r}", text.encode()))
    cases.append(("20 KB of base64 'A'", b"A" * 20_480))
    cases.append(("20 KB of garbage", bytes(rng.choice(printable.encode()) for _ in range(20_480))))
    cases.append(("latin-1 bytes", b"\xff\xfe\xfd" + b64(b"{}")))
    cases.append(("base64 of invalid UTF-8", b64(b'{"x402Version":1,"scheme":"\xff\xfe"}')))
    cases.append(("base64 of UTF-16 JSON", b64('{"x402Version":1}'.encode("utf-16"))))
    return cases


def all_cases(gw: GatewayUnderTest, base_chain: DevChain) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    v1, v2 = templates(gw, base_chain)
    return raw_cases(rng) + structured_cases(v1, v2, rng)


def check(client: httpx.Client, header: str, label: str, value: bytes) -> tuple[str | None, str]:
    """(None if the answer is a proper refusal else what went wrong, the refusal's reason)."""
    try:
        response = client.post("/paid", headers={header: value})
    except httpx.HTTPError as exc:
        return f"{header} {label}: transport error {exc!r}", ""
    # A header over the server's request-header cap is refused as such (431) before any payment logic runs.
    allowed = (400, 402, 431) if "20 KB" in label else (400, 402)
    if response.status_code not in allowed:
        return f"{header} {label}: status {response.status_code} {response.text[:200]}", ""
    try:
        body = response.json()
    except ValueError:
        return f"{header} {label}: non-JSON body {response.text[:200]!r}", ""
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        return f"{header} {label}: no machine-readable error in {response.text[:200]}", ""
    if response.status_code == 402:
        required = b64json(response.headers["payment-required"])
        if required.get("error") != body["error"] or not body.get("accepts"):
            return f"{header} {label}: a 402 without the full challenge", body["error"]
    return None, body["error"]


def test_malformed_payment_headers_are_refused_with_a_reason_never_5xx_never_upstream(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    gw.upstream.reset()
    cases = all_cases(gw, base_chain)
    assert len(cases) >= 300
    jobs = [(header, label, value) for label, value in cases for header in HEADERS]
    problems: list[str] = []
    reasons_seen: dict[str, int] = {}
    still_valid: dict[str, str] = {}

    # One connection, one request at a time: the still-valid spellings share one authorization, and presented
    # concurrently they would (rightly) meet 409 payment_in_flight instead of the verifier's answer.
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        for header, label, value in jobs:
            problem, reason = check(client, header, label, value)
            if problem:
                problems.append(problem)
            reasons_seen[reason] = reasons_seen.get(reason, 0) + 1
            if label.split(" ", 1)[1] in STILL_VALID:
                still_valid[f"{header} {label}"] = reason
    assert not problems, f"{len(problems)} of {len(jobs)} malformed headers were mishandled:\n" + "\n".join(
        problems[:40]
    )
    assert gw.upstream.requests == []
    # Sanity: the corpus exercises the parser (400) and the verifier (402s with several reasons), and the
    # re-spellings of the valid template are understood as the same payment (refused only for lack of funds).
    assert "invalid_payment_header" in reasons_seen, reasons_seen
    assert len(reasons_seen) >= 6, reasons_seen
    for label, reason in still_valid.items():
        assert reason == "invalid_exact_evm_insufficient_balance", (label, reason)
    assert len(still_valid) == 2 * len(STILL_VALID) * len(HEADERS)


def test_both_payment_headers_at_once_are_refused_without_upstream(gw: GatewayUnderTest) -> None:
    gw.upstream.reset()
    response = httpx.post(gw.url + "/paid", headers={"X-PAYMENT": "e30=", "PAYMENT-SIGNATURE": "!!"})
    assert response.status_code in (400, 402)
    assert response.json()["error"]
    assert gw.upstream.requests == []


def test_oversized_payment_header_is_refused_before_parsing(gw: GatewayUnderTest, tmp_path: Path) -> None:
    # 20 KB: over the server's request-header cap (16 KiB by default) -> 431 before any payment logic runs.
    gw.upstream.reset()
    for header in HEADERS:
        response = httpx.post(gw.url + "/paid", headers={header: "A" * 20_480})
        assert response.status_code == 431, response.text
        assert response.json()["error"] == "headers_too_large"
    assert gw.upstream.requests == []


def test_oversized_payment_header_under_a_larger_server_cap_has_its_own_reason(
    base_chain: DevChain, tmp_path: Path
) -> None:
    # With a server that accepts larger headers, the payment parser's own 16 KiB cap still refuses it.
    server = {"max_header_bytes": 64 * 1024}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), server=server) as big:
        for header in HEADERS:
            response = httpx.post(big.url + "/paid", headers={header: "A" * 20_480})
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "payment_header_too_large"
        assert big.upstream.requests == []


def test_trailing_newline_in_an_address_is_a_400_not_a_500(gw: GatewayUnderTest, base_chain: DevChain) -> None:
    gw.upstream.reset()
    _, v2 = templates(gw, base_chain)
    auth = v2["payload"]["authorization"]
    bad = with_value(v2, ("payload", "authorization", "from"), auth["from"] + "\n")
    response = httpx.post(gw.url + "/paid", headers={"PAYMENT-SIGNATURE": js(bad)})
    assert gw.upstream.requests == []
    assert response.status_code in (400, 402), response.text
    assert response.json()["error"] == "invalid_payment_header"
