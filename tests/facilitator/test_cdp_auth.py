"""CdpAuth: the per-request JWT Coinbase's hosted facilitator wants (docs/protocol.md §3); the secret never shows."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from Crypto.Hash import SHA256
from Crypto.PublicKey import ECC
from Crypto.Signature import DSS, eddsa

from gateway.chain.facilitator import CdpAuth
from gateway.errors import ConfigError

KEY_ID = "organizations/0f1e2d3c/apiKeys/4b5a6978"
VERIFY_URL = "https://api.cdp.coinbase.com/platform/v2/x402/verify"


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def split_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    header, claims, signature = token.split(".")
    return (
        json.loads(b64url_decode(header)),
        json.loads(b64url_decode(claims)),
        f"{header}.{claims}".encode("ascii"),
        b64url_decode(signature),
    )


def es256_key() -> tuple[str, ECC.EccKey]:
    key = ECC.generate(curve="P-256")
    return key.export_key(format="PEM", use_pkcs8=False), key.public_key()  # "BEGIN EC PRIVATE KEY", as CDP


def ed25519_key() -> tuple[str, ECC.EccKey]:
    key = ECC.generate(curve="Ed25519")
    public = key.public_key()
    secret = base64.b64encode(key.seed + public.export_key(format="raw")).decode("ascii")
    return secret, public


def assert_claims(header: dict[str, Any], claims: dict[str, Any], alg: str, uri: str) -> None:
    assert header["alg"] == alg
    assert header["kid"] == KEY_ID
    assert header["typ"] == "JWT"
    assert isinstance(header["nonce"], str) and len(header["nonce"]) == 16
    assert claims["sub"] == KEY_ID
    assert claims["iss"] == "cdp"
    assert abs(claims["nbf"] - time.time()) < 5
    assert claims["exp"] == claims["nbf"] + 120
    assert claims["uris"] == [uri]


def test_es256_jwt_decodes_as_specified_and_verifies_with_the_public_key() -> None:
    secret, public = es256_key()
    auth = CdpAuth(env={"CDP_API_KEY_ID": KEY_ID, "CDP_API_KEY_SECRET": secret})
    assert auth.algorithm == "ES256"
    ((name, value),) = auth.headers("post", VERIFY_URL).items()
    assert name == "Authorization" and value.startswith("Bearer ")
    header, claims, signed, signature = split_jwt(value.removeprefix("Bearer "))
    assert_claims(header, claims, "ES256", "POST api.cdp.coinbase.com/platform/v2/x402/verify")
    assert len(signature) == 64  # JWS ES256 is raw r||s, not DER
    DSS.new(public, "fips-186-3", encoding="binary").verify(SHA256.new(signed), signature)  # raises if invalid
    with pytest.raises(ValueError):
        DSS.new(public, "fips-186-3", encoding="binary").verify(SHA256.new(signed + b"x"), signature)


def test_ed25519_jwt_decodes_as_specified_and_verifies_with_the_public_key() -> None:
    secret, public = ed25519_key()
    auth = CdpAuth("MY_ID", "MY_SECRET", env={"MY_ID": KEY_ID, "MY_SECRET": secret})
    assert auth.algorithm == "EdDSA"
    token = auth.headers("GET", "https://api.cdp.coinbase.com/platform/v2/x402/supported")["Authorization"][7:]
    header, claims, signed, signature = split_jwt(token)
    assert_claims(header, claims, "EdDSA", "GET api.cdp.coinbase.com/platform/v2/x402/supported")
    eddsa.new(public, "rfc8032").verify(signed, signature)
    with pytest.raises(ValueError):
        eddsa.new(public, "rfc8032").verify(signed + b"x", signature)


def test_every_request_gets_a_fresh_nonce() -> None:
    secret, _ = ed25519_key()
    auth = CdpAuth(env={"CDP_API_KEY_ID": KEY_ID, "CDP_API_KEY_SECRET": secret})
    nonces = {split_jwt(auth.token("POST", VERIFY_URL))[0]["nonce"] for _ in range(20)}
    assert len(nonces) == 20


def test_a_pem_key_with_escaped_newlines_from_an_env_file_is_accepted() -> None:
    secret, public = es256_key()
    auth = CdpAuth(env={"CDP_API_KEY_ID": KEY_ID, "CDP_API_KEY_SECRET": secret.replace("\n", "\\n")})
    _, _, signed, signature = split_jwt(auth.token("POST", VERIFY_URL))
    DSS.new(public, "fips-186-3", encoding="binary").verify(SHA256.new(signed), signature)


@pytest.mark.parametrize("make", [es256_key, ed25519_key], ids=["es256", "ed25519"])
def test_repr_and_str_never_show_the_secret(make: Any) -> None:
    secret, _ = make()
    auth = CdpAuth(env={"CDP_API_KEY_ID": KEY_ID, "CDP_API_KEY_SECRET": secret})
    for text in (repr(auth), str(auth), f"{auth}"):
        assert KEY_ID in text
        assert "$CDP_API_KEY_SECRET" in text
        for line in secret.splitlines():
            if "BEGIN" not in line and "END" not in line:
                assert line[:16] not in text


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "CDP_API_KEY_ID"),
        ({"CDP_API_KEY_ID": KEY_ID}, "CDP_API_KEY_SECRET"),
        ({"CDP_API_KEY_ID": KEY_ID, "CDP_API_KEY_SECRET": "bm90LWEta2V5LXNlY3JldC12YWx1ZQ=="}, "CDP_API_KEY_SECRET"),
        ({"CDP_API_KEY_ID": KEY_ID, "CDP_API_KEY_SECRET": "-----BEGIN EC PRIVATE KEY-----\nZm9v\n-----END"}, "CDP"),
        ({"CDP_API_KEY_ID": KEY_ID, "CDP_API_KEY_SECRET": "s3cr3t-n0t-base64!"}, "CDP_API_KEY_SECRET"),
    ],
    ids=["no-id", "no-secret", "wrong-length", "bad-pem", "not-base64"],
)
def test_missing_or_malformed_keys_fail_at_start_without_echoing_the_secret(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as info:
        CdpAuth(env=env)
    assert names in str(info.value)
    secret = env.get("CDP_API_KEY_SECRET")
    if secret:
        assert secret not in str(info.value) and secret not in repr(info.value)


def test_an_ed25519_secret_whose_halves_do_not_match_is_refused() -> None:
    secret, _ = ed25519_key()
    other, _ = ed25519_key()
    mixed = base64.b64encode(base64.b64decode(secret)[:32] + base64.b64decode(other)[32:]).decode()
    with pytest.raises(ConfigError, match="does not match"):
        CdpAuth(env={"CDP_API_KEY_ID": KEY_ID, "CDP_API_KEY_SECRET": mixed})
