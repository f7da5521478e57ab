"""The payer proofs (gateway.jobs.auth): what opens a job, and everything that must not."""

from __future__ import annotations

import time

from eth_account import Account

from gateway.client.jobauth import payer_auth_headers
from gateway.jobs.auth import bearer_token, new_token, token_hash, token_matches, verify_payer_auth

PATH = "/agent/job/job_1"


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
