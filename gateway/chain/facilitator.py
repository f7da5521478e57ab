"""Remote verification and settlement: an HTTP client for an x402 facilitator (docs/protocol.md §3).

In "facilitator" mode the gateway does not check or submit EIP-3009 authorizations itself; it sends the client's
payment payload together with the server's *own* requirement (never the client's ``accepted`` copy) to
``POST {base}/verify`` and ``POST {base}/settle``. The answers are validated field by field before anything is
believed, and failures map onto the gateway's error tree:

* no answer (connection refused or dropped, timeout, HTTP 5xx/408/429) -> :class:`FacilitatorUnavailable` (503);
  its ``request_sent`` tells whether the facilitator may have acted on the request (matters for settle);
* an answer that is not JSON, or JSON without the required fields -> :class:`~gateway.errors.BadGateway`
  (502, reason ``facilitator_bad_answer``);
* a refusal (``isValid: false`` / ``success: false``, also inside an HTTP 4xx) -> a normal result, with the
  facilitator's reason (a clean machine-readable token, else a generic one);
* ``success: false`` + ``errorReason: "settlement_pending"`` + a transaction hash -> a result carrying the hash:
  the transaction was broadcast and its receipt not seen yet. Reconcile by hash; never settle again.

Messages never contain the facilitator URL (it may embed a key), credentials, or the raw payment. Coinbase's
hosted facilitator wants a per-request JWT signed with a CDP API key: :class:`CdpAuth`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from Crypto.Hash import SHA256
from Crypto.PublicKey import ECC
from Crypto.Signature import DSS, eddsa

from gateway.config import Secret
from gateway.errors import BadGateway, ConfigError, ServiceUnavailable
from gateway.networks import KNOWN_NETWORKS
from gateway.secrets import env_var
from gateway.x402 import reasons
from gateway.x402.codec import dumps, loads

log = logging.getLogger("gateway.facilitator")

__all__ = [
    "BAD_ANSWER",
    "SETTLEMENT_PENDING",
    "CdpAuth",
    "FacilitatorClient",
    "FacilitatorUnavailable",
    "SettleResult",
    "VerifyResult",
]

BAD_ANSWER = reasons.FACILITATOR_BAD_ANSWER
SETTLEMENT_PENDING = reasons.SETTLEMENT_PENDING
_MAX_ANSWER_BYTES = 1 << 20
_TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
# A reason goes into our own 402 body as a machine-readable token; anything else from a facilitator is replaced.
_REASON = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")
_VERIFY_REJECTED = reasons.FACILITATOR_REJECTED
_SETTLE_REJECTED = reasons.SETTLEMENT_FAILED


class FacilitatorUnavailable(ServiceUnavailable):
    """The facilitator did not answer (refused, dropped, timed out, HTTP 5xx/408/429).

    ``request_sent`` is False only when the request certainly never reached it (connection refused, connect
    timeout, DNS failure, HTTP 408/429): after a ``settle`` that raised with ``request_sent=True`` the payment
    may have been submitted, so the outcome is unknown until reconciled on chain.
    """

    default_reason = reasons.FACILITATOR_UNAVAILABLE

    def __init__(self, message: str = "", *, reason: str | None = None, request_sent: bool = True) -> None:
        super().__init__(message, reason=reason)
        self.request_sent = request_sent


@dataclass(frozen=True, slots=True)
class VerifyResult:
    is_valid: bool
    invalid_reason: str | None  # set exactly when not is_valid
    payer: str | None


@dataclass(frozen=True, slots=True)
class SettleResult:
    success: bool
    transaction: str  # tx hash, "" when nothing was broadcast (a failure may still carry a reverted tx's hash)
    network: str
    payer: str | None
    error_reason: str | None  # set exactly when not success; "settlement_pending" => reconcile ``transaction``

    @property
    def pending(self) -> bool:
        return not self.success and self.error_reason == SETTLEMENT_PENDING


# --------------------------------------------------------------------------------------------------------------
# CDP authentication
# --------------------------------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class CdpAuth:
    """``Authorization: Bearer <JWT>`` for Coinbase's hosted facilitator, one fresh JWT per request.

    The API key id and secret are read from the environment variables named here (never from the config file).
    The secret is either a PEM EC P-256 key (signs ES256) or base64 of 64 bytes, an Ed25519 seed followed by
    its public key (signs EdDSA), as the CDP portal hands them out. Header ``{alg, kid, typ, nonce}``; claims
    ``{sub, iss: "cdp", iat, nbf, exp: nbf+120, uris: ["POST api.cdp.coinbase.com/platform/v2/x402/verify"]}``.
    """

    __slots__ = ("_alg", "_expires_in", "_key", "_key_id", "_secret_env")

    def __init__(
        self,
        key_id_env: str = "CDP_API_KEY_ID",
        key_secret_env: str = "CDP_API_KEY_SECRET",  # noqa: S107 - the variable's name, not a secret
        *,
        env: Mapping[str, str] | None = None,
        expires_in: int = 120,
    ) -> None:
        source = os.environ if env is None else env
        key_id = source.get(key_id_env, "").strip()
        secret = source.get(key_secret_env, "").strip()
        if not key_id:
            raise ConfigError(env_var(key_id_env), "is not set (CDP API key id)")
        if not secret:
            raise ConfigError(env_var(key_secret_env), "is not set (CDP API key secret)")
        self._key_id = key_id
        self._secret_env = key_secret_env
        self._expires_in = expires_in
        self._alg, self._key = _parse_cdp_secret(secret, env_var(key_secret_env))

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def algorithm(self) -> Literal["ES256", "EdDSA"]:
        return self._alg

    def __repr__(self) -> str:
        return f"CdpAuth(key_id={self._key_id!r}, alg={self._alg}, secret=${self._secret_env})"

    __str__ = __repr__

    def token(self, method: str, url: str, *, now: int | None = None) -> str:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        nbf = int(time.time()) if now is None else now
        header = {
            "alg": self._alg,
            "kid": self._key_id,
            "typ": "JWT",
            "nonce": "".join(secrets.choice("0123456789") for _ in range(16)),
        }
        claims = {
            "sub": self._key_id,
            "iss": "cdp",
            "iat": nbf,
            "nbf": nbf,
            "exp": nbf + self._expires_in,
            "uris": [f"{method.upper()} {host}{parts.path}"],
        }
        signing_input = f"{_b64url(dumps(header))}.{_b64url(dumps(claims))}".encode("ascii")
        if self._alg == "ES256":
            signature = DSS.new(self._key, "deterministic-rfc6979", encoding="binary").sign(SHA256.new(signing_input))
        else:
            signature = eddsa.new(self._key, "rfc8032").sign(signing_input)
        return f"{signing_input.decode('ascii')}.{_b64url(signature)}"

    def headers(self, method: str, url: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(method, url)}"}


def _parse_cdp_secret(secret: str, shown: str) -> tuple[Literal["ES256", "EdDSA"], ECC.EccKey]:
    # ``shown``: how errors name the variable (gateway.secrets.env_var), never the secret
    # Keys pasted into env files often carry literal "\n" sequences instead of newlines.
    text = secret.replace("\\n", "\n")
    if "-----BEGIN" in text:
        try:
            key = ECC.import_key(text)
        except (ValueError, IndexError, TypeError):
            raise ConfigError(shown, "not a readable PEM private key") from None
        if not key.has_private():
            raise ConfigError(shown, "the PEM key is a public key, a private key is required")
        if key.curve == "NIST P-256":
            return "ES256", key
        if key.curve == "Ed25519":
            return "EdDSA", key
        raise ConfigError(shown, f"unsupported key curve {key.curve} (P-256 or Ed25519 expected)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(shown, "neither a PEM EC key nor a base64 Ed25519 key") from None
    if len(raw) != 64:
        raise ConfigError(shown, "a base64 Ed25519 key must decode to 64 bytes (seed + public key)")
    key = eddsa.import_private_key(raw[:32])
    if key.public_key().export_key(format="raw") != raw[32:]:
        raise ConfigError(shown, "the Ed25519 key's public half does not match its seed")
    return "EdDSA", key


# --------------------------------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------------------------------


def _same_network(a: str, b: str) -> bool:
    """``base`` and ``eip155:8453`` name the same network (a v1 answer may use either)."""
    if a == b:
        return True
    known = {n.name: n.caip2 for n in KNOWN_NETWORKS.values()}
    return known.get(a, a) == known.get(b, b)


def _reason(value: Any, fallback: str) -> str:
    return value if isinstance(value, str) and _REASON.match(value) else fallback


def _optional_str(doc: Mapping[str, Any], key: str, what: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise BadGateway(f"{what}: field {key} is not a string", reason=BAD_ANSWER)
    return value


class FacilitatorClient:
    """One remote facilitator, over the gateway's pooled aiohttp session (:meth:`start`)."""

    def __init__(
        self, base_url: Secret, *, timeout: float = 15.0, auth: CdpAuth | None = None, name: str = "facilitator"
    ) -> None:
        url = base_url.reveal().rstrip("/")
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"{name}: the facilitator URL must be http(s)")
        self.name = name
        self._base_url = base_url
        self._url = url
        self._auth = auth
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"FacilitatorClient({self.name!r}, url={self._base_url!r}, auth={self._auth!r})"

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    # ---------------------------------------------------------------------------------------------- API

    async def supported(self) -> list[dict[str, Any]]:
        """The ``kinds`` of ``GET {base}/supported``: ``[{"x402Version", "scheme", "network", "extra"?}, ...]``."""
        status, doc = await self._call("GET", "/supported", None)
        what = f"{self.name}: /supported"
        if not 200 <= status < 300 or not isinstance(doc, dict) or not isinstance(doc.get("kinds"), list):
            raise BadGateway(f"{what} answered HTTP {status} without a kinds list", reason=BAD_ANSWER)
        kinds: list[dict[str, Any]] = []
        for kind in doc["kinds"]:
            if not (
                isinstance(kind, dict)
                and type(kind.get("x402Version")) is int
                and isinstance(kind.get("scheme"), str)
                and isinstance(kind.get("network"), str)
            ):
                raise BadGateway(f"{what}: a kind lacks x402Version/scheme/network", reason=BAD_ANSWER)
            kinds.append(kind)
        return kinds

    @staticmethod
    def supports(kinds: Sequence[Mapping[str, Any]], *, version: int, scheme: str, network: str) -> bool:
        """Whether ``kinds`` (from :meth:`supported`) covers this version, scheme and network (``eip155:*`` too)."""
        for kind in kinds:
            if kind.get("x402Version") != version or kind.get("scheme") != scheme:
                continue
            offered = kind.get("network")
            if offered == network:
                return True
            if isinstance(offered, str) and offered.endswith(":*") and network.startswith(offered[:-1]):
                return True
        return False

    async def verify(self, version: int, payment_payload: dict[str, Any], requirements: dict[str, Any]) -> VerifyResult:
        status, doc = await self._call("POST", "/verify", self._body(version, payment_payload, requirements))
        what = f"{self.name}: /verify"
        if not isinstance(doc, dict) or not isinstance(doc.get("isValid"), bool):
            raise BadGateway(f"{what} answered HTTP {status} without isValid", reason=BAD_ANSWER)
        is_valid: bool = doc["isValid"]
        if is_valid and not 200 <= status < 300:
            raise BadGateway(f"{what} answered isValid=true with HTTP {status}", reason=BAD_ANSWER)
        payer = _optional_str(doc, "payer", what)
        if is_valid:
            return VerifyResult(is_valid=True, invalid_reason=None, payer=payer)
        return VerifyResult(
            is_valid=False, invalid_reason=_reason(doc.get("invalidReason"), _VERIFY_REJECTED), payer=payer
        )

    async def settle(self, version: int, payment_payload: dict[str, Any], requirements: dict[str, Any]) -> SettleResult:
        """Submit the payment. Raises only when the outcome is not known from the answer (see the module doc)."""
        status, doc = await self._call("POST", "/settle", self._body(version, payment_payload, requirements))
        what = f"{self.name}: /settle"
        if not isinstance(doc, dict) or not isinstance(doc.get("success"), bool):
            raise BadGateway(f"{what} answered HTTP {status} without success", reason=BAD_ANSWER)
        success: bool = doc["success"]
        if success and not 200 <= status < 300:
            raise BadGateway(f"{what} answered success=true with HTTP {status}", reason=BAD_ANSWER)
        transaction = doc.get("transaction", "")
        if transaction is None:
            transaction = ""
        if not isinstance(transaction, str):
            raise BadGateway(f"{what}: field transaction is not a string", reason=BAD_ANSWER)
        expected_network = str(requirements.get("network", ""))
        network = doc.get("network") or expected_network
        if not isinstance(network, str):
            raise BadGateway(f"{what}: field network is not a string", reason=BAD_ANSWER)
        payer = _optional_str(doc, "payer", what)
        if success:
            if not _TX_HASH.match(transaction):
                raise BadGateway(f"{what} answered success without a transaction hash", reason=BAD_ANSWER)
            if not _same_network(network, expected_network):
                raise BadGateway(f"{what} settled on another network than required", reason=BAD_ANSWER)
            return SettleResult(success=True, transaction=transaction, network=network, payer=payer, error_reason=None)
        reason = _reason(doc.get("errorReason"), _SETTLE_REJECTED)
        if reason == SETTLEMENT_PENDING and not _TX_HASH.match(transaction):
            # Broadcast but no hash to reconcile with: the outcome is unknown, which only the caller can resolve.
            raise BadGateway(f"{what} answered settlement_pending without a transaction hash", reason=BAD_ANSWER)
        return SettleResult(
            success=False,
            transaction=transaction if _TX_HASH.match(transaction) else "",
            network=network,
            payer=payer,
            error_reason=reason,
        )

    # ---------------------------------------------------------------------------------------------- transport

    @staticmethod
    def _body(version: int, payment_payload: dict[str, Any], requirements: dict[str, Any]) -> bytes:
        if version not in (1, 2):
            raise ValueError(f"unsupported x402 version {version}")
        return dumps({"x402Version": version, "paymentPayload": payment_payload, "paymentRequirements": requirements})

    async def _call(self, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
        """(HTTP status, parsed JSON) of a 2xx/4xx answer; raises for everything that is not an answer."""
        if self._session is None:
            raise FacilitatorUnavailable(f"{self.name}: client not started", request_sent=False)
        url = self._url + path
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._auth is not None:
            headers.update(self._auth.headers(method, url))
        what = f"{self.name}: {path}"
        try:
            async with self._session.request(
                method, url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                if status >= 500 or status in (408, 429):
                    raise FacilitatorUnavailable(f"{what} answered HTTP {status}", request_sent=status >= 500)
                raw = await _read_capped(resp)
        except FacilitatorUnavailable:
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Never echo the exception text: it contains the URL (and any key in it).
            log.warning("facilitator unreachable", extra={"facilitator": self.name, "error": type(exc).__name__})
            raise FacilitatorUnavailable(f"{what}: no connection ({type(exc).__name__})", request_sent=False) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("facilitator did not answer", extra={"facilitator": self.name, "error": type(exc).__name__})
            raise FacilitatorUnavailable(f"{what}: no answer ({type(exc).__name__})") from None
        if raw is None:
            raise BadGateway(f"{what}: answer larger than {_MAX_ANSWER_BYTES} bytes", reason=BAD_ANSWER)
        if not 200 <= status < 500 or 300 <= status < 400:
            raise BadGateway(f"{what} answered HTTP {status}", reason=BAD_ANSWER)
        try:
            doc = loads(raw)
        except ValueError:
            if status in {401, 403}:
                raise BadGateway(f"{what} refused our credentials (HTTP {status})", reason=BAD_ANSWER) from None
            raise BadGateway(f"{what} answered HTTP {status} with a body that is not JSON", reason=BAD_ANSWER) from None
        return status, doc


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(65536):
        size += len(chunk)
        if size > _MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
