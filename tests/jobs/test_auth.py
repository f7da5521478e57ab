"""The payer proofs (gateway.jobs.auth): what opens a job, and everything that must not."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from gateway.client.jobauth import payer_auth_headers
from gateway.jobs.auth import (
    PAYER_AUTH_EXPIRED,
    PAYER_AUTH_MALFORMED,
    PAYER_AUTH_WRONG_MESSAGE,
    SignedRequest,
    bearer_token,
    header_problem,
    mistaken_signers,
    new_token,
    payer_auth_message,
    read_payer_auth,
    token_hash,
    token_matches,
    verify_payer_auth,
    wrong_message,
)
from gateway.x402.payer_auth import format_payer_auth

PATH = "/agent/job/job_1"
ROOT = Path(__file__).resolve().parents[2]


def header(account: object, method: str = "GET", path: str = PATH, now: int | None = None) -> bytes:
    return payer_auth_headers(account, method, path, now=now)["X-Payer-Auth"].encode()  # type: ignore[arg-type]


def test_a_job_token_is_32_random_bytes_and_only_its_hash_is_kept() -> None:
    token, digest = new_token()
    assert len(token) == 43 and "=" not in token
    assert digest == token_hash(token) and token not in digest
    assert token_matches(token, digest)
    assert not token_matches(new_token()[0], digest)
    assert not token_matches(None, digest) and not token_matches(token, None)


def test_the_token_is_read_from_a_bearer_authorization_or_the_token_header_and_nothing_else() -> None:
    token, _ = new_token()
    assert bearer_token(f"Bearer {token}".encode(), None) == token
    assert bearer_token(f"bearer  {token} ".encode(), None) == token
    assert bearer_token(None, token.encode()) == token
    assert bearer_token(f"Basic {token}".encode(), None) is None
    assert bearer_token(b"Bearer short", None) is None
    assert bearer_token(f"Bearer {token}x".encode(), None) is None


def test_a_wallet_signature_recovers_the_payer_for_that_method_and_path_only() -> None:
    payer = Account.create()
    now = int(time.time())
    assert verify_payer_auth(header(payer, now=now), "GET", PATH, now=now) == payer.address.lower()
    assert verify_payer_auth(header(payer, now=now), "POST", PATH, now=now) != payer.address.lower()
    assert verify_payer_auth(header(payer, now=now), "GET", "/agent/job/job_2", now=now) != payer.address.lower()


def test_a_stale_or_future_signature_is_refused_so_a_seen_header_stops_working() -> None:
    payer = Account.create()
    now = int(time.time())
    assert verify_payer_auth(header(payer, now=now - 301), "GET", PATH, now=now) is None
    assert verify_payer_auth(header(payer, now=now + 301), "GET", PATH, now=now) is None
    assert verify_payer_auth(header(payer, now=now - 299), "GET", PATH, now=now) == payer.address.lower()


def test_malformed_payer_auth_headers_are_refused_without_raising() -> None:
    now = int(time.time())
    good = header(Account.create(), now=now).decode()
    ts, sig = good.split(".", 1)
    for bad in (
        b"",
        b"garbage",
        f"{ts}".encode(),
        f"{ts}.{sig[:-2]}".encode(),
        f"{ts}.{sig}00".encode(),
        f"-{ts}.{sig}".encode(),
        f"{ts}.0x{'00' * 65}".encode(),
        f"{ts}.0x{'ff' * 65}".encode(),
        b"9" * 300,
        None,
    ):
        assert verify_payer_auth(bad, "GET", PATH, now=now) is None


def test_a_signature_is_accepted_with_or_without_its_0x() -> None:
    payer = Account.create()
    now = int(time.time())
    with_prefix = header(payer, now=now)
    without = with_prefix.replace(b".0x", b".", 1)
    assert b"0x" not in without
    assert verify_payer_auth(without, "GET", PATH, now=now) == payer.address.lower()
    assert verify_payer_auth(with_prefix, "GET", PATH, now=now) == payer.address.lower()
    assert read_payer_auth(without) == read_payer_auth(with_prefix)
    assert read_payer_auth(without[:-2]) is None  # still exactly 65 bytes


def test_a_malformed_or_stale_header_is_named_as_such_whatever_the_request() -> None:
    payer = Account.create()
    now = int(time.time())
    assert header_problem(header(payer, now=now), now=now) is None
    stale = header_problem(header(payer, now=now - 301), now=now)
    assert stale is not None and stale.reason == PAYER_AUTH_EXPIRED
    assert f"({now})" in stale.message and "301 s before" in stale.message
    ahead = header_problem(header(payer, now=now + 400), now=now)
    assert ahead is not None and "ahead of" in ahead.message
    for bad in (b"garbage", f"{now}.0x1234".encode(), b""):
        problem = header_problem(bad, now=now)
        assert problem is not None and problem.reason == PAYER_AUTH_MALFORMED
    millis = header(payer, now=now).replace(str(now).encode(), str(now * 1000).encode(), 1)
    problem = header_problem(millis, now=now)
    assert problem is not None and problem.reason == PAYER_AUTH_MALFORMED and "milliseconds" in problem.message


@pytest.mark.parametrize(
    ("method", "signed_path", "what"),
    [
        ("GET", "/api/messaging/jobs?status=completed&limit=5", "the path with its query string"),
        ("GET", "https://api.example.com/api/messaging/jobs", "the full URL"),
    ],
)
def test_a_signature_over_a_common_wrong_text_is_recognised_and_the_right_text_named(
    method: str, signed_path: str, what: str
) -> None:
    payer = Account.create()
    now = int(time.time())
    value = header(payer, method, signed_path, now=now)
    request = SignedRequest(method, "/api/messaging/jobs", "status=completed&limit=5", "https://api.example.com")
    # The right text recovers some unrelated address: the gateway cannot tell this from another wallet...
    assert verify_payer_auth(value, method, request.path, now=now) != payer.address.lower()
    # ...but one of the usual mistakes recovers the payer, and the answer names it and the text to sign.
    assert (payer.address.lower(), what) in mistaken_signers(value, request)
    problem = wrong_message(value, request, what)
    assert problem.reason == PAYER_AUTH_WRONG_MESSAGE
    assert json.dumps(payer_auth_message("GET", "/api/messaging/jobs", now)) in problem.message
    # A correct signature is no mistake: none of the mistaken readings recovers the payer.
    right = header(payer, method, request.path, now=now)
    assert payer.address.lower() not in {signer for signer, _ in mistaken_signers(right, request)}


def test_a_lowercase_method_or_a_trailing_newline_is_recognised_too() -> None:
    payer = Account.create()
    now = int(time.time())
    request = SignedRequest("GET", PATH)
    for text, what in (
        (f"x402 jobs\nget {PATH}\n{now}", "a lowercase method"),
        (payer_auth_message("GET", PATH, now) + "\n", "the message with a trailing newline"),
    ):
        signature = payer.sign_message(encode_defunct(text=text)).signature
        value = format_payer_auth(now, bytes(signature)).encode()
        assert (payer.address.lower(), what) in mistaken_signers(value, request)


def _documented(path: Path) -> tuple[str, int, str, str]:
    """(path, timestamp, header value, signer) of the X-Payer-Auth example in a document."""
    text = path.read_text()
    value = re.search(r"X-Payer-Auth: (\d+\.0x[0-9a-f]{130})", text)
    message = re.search(r"x402 jobs(?:\\n|\n)GET (\S+)(?:\\n|\n)(\d+)", text)  # "\n" escaped, or real lines
    signer = re.search(r"signed by `(0x[0-9a-fA-F]{40})`|the wallet `(0x[0-9a-fA-F]{40})`", text)
    assert value and message and signer, path
    return message.group(1), int(message.group(2)), value.group(1), signer.group(1) or signer.group(2)


@pytest.mark.parametrize("doc", ["README.md", "docs/jobs.md"])
def test_the_documented_example_header_opens_the_documented_path_for_the_documented_wallet(doc: str) -> None:
    path, timestamp, value, signer = _documented(ROOT / doc)
    assert value.startswith(f"{timestamp}.")
    recovered = verify_payer_auth(value.encode(), "GET", path, now=timestamp)
    assert recovered == signer.lower()
    assert verify_payer_auth(value.encode(), "GET", path + "?x=1", now=timestamp) != signer.lower()


def test_a_signature_no_key_could_have_made_is_malformed_whatever_it_signs() -> None:
    now = int(time.time())
    for signature in ("00" * 65, "ff" * 65):
        problem = header_problem(f"{now}.0x{signature}".encode(), now=now)
        assert problem is not None and problem.reason == PAYER_AUTH_MALFORMED
