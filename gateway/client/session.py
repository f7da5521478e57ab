"""Paying through a ``batch-settlement`` channel, the low-level part: read a session offer, sign vouchers, deposits
and refunds, build the ``PAYMENT-SIGNATURE`` header, read the answers (docs/sessions.md).

Every digest is :mod:`gateway.x402.sessions`'s, the one implementation the gateway checks against. The client
with ``pay_with="session"`` (:mod:`gateway.client._sessions`) is built on these functions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from eth_account.signers.local import LocalAccount
from eth_typing import Hash32

from gateway.client.exact import MAX_VALIDITY_SECONDS
from gateway.networks import KNOWN_NETWORKS
from gateway.x402.codec import decode_header, encode_header
from gateway.x402.eip712 import recover_signer
from gateway.x402.sessions import (
    SCHEME,
    ChannelConfig,
    DepositAuthorization,
    receive_authorization_digest,
    voucher_digest,
)

__all__ = [
    "CorrectiveState",
    "SessionOffer",
    "SessionReceipt",
    "channel_config",
    "corrective_state",
    "new_salt",
    "session_header",
    "session_offers",
    "session_receipt",
    "sign_deposit",
    "sign_voucher",
    "signed_by",
]


def _chain_id(network: str) -> int | None:
    if network.startswith("eip155:"):
        tail = network.split(":", 1)[1]
        return int(tail) if tail.isdigit() else None
    known = KNOWN_NETWORKS.get(network)
    return known.chain_id if known else None


@dataclass(frozen=True, slots=True)
class SessionOffer:
    """One ``batch-settlement`` entry of a 402: ``amount`` is the most one request can be charged."""

    requirement: Mapping[str, Any]  # exactly as the server sent it: echoed as ``accepted``
    resource: Mapping[str, Any] | None  # the 402's top-level resource
    network: str
    chain_id: int
    amount: int
    asset: str  # addresses lower-case
    pay_to: str
    receiver_authorizer: str
    withdraw_delay: int
    min_deposit: int
    token_name: str
    token_version: str
    max_timeout: int

    @classmethod
    def parse(cls, req: Any, resource: Any = None) -> SessionOffer | None:
        """The offer, or None for another scheme or an entry this client cannot pay (no receiver authorizer)."""
        if not isinstance(req, dict) or req.get("scheme") != SCHEME:
            return None
        extra = req.get("extra")
        if not isinstance(extra, dict):
            return None
        try:
            network = str(req["network"])
            chain_id = _chain_id(network)
            authorizer = str(extra["receiverAuthorizer"]).lower()
            if chain_id is None or int(authorizer, 16) == 0:
                return None
            return cls(
                requirement=req,
                resource=resource if isinstance(resource, dict) else None,
                network=network,
                chain_id=chain_id,
                amount=int(str(req["amount"])),
                asset=str(req["asset"]).lower(),
                pay_to=str(req["payTo"]).lower(),
                receiver_authorizer=authorizer,
                withdraw_delay=int(extra["withdrawDelay"]),
                min_deposit=int(str(extra.get("minDeposit") or 0)),
                token_name=str(extra.get("name") or "USD Coin"),
                token_version=str(extra.get("version") or "2"),
                max_timeout=int(req.get("maxTimeoutSeconds") or 300),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def same_terms(self, other: SessionOffer) -> bool:
        """Would a channel opened for ``other`` pay this offer too?"""
        return (self.chain_id, self.asset, self.pay_to, self.receiver_authorizer, self.withdraw_delay) == (
            other.chain_id,
            other.asset,
            other.pay_to,
            other.receiver_authorizer,
            other.withdraw_delay,
        )


def session_offers(payment_required: Any) -> list[SessionOffer]:
    """The session offers of a decoded v2 ``PAYMENT-REQUIRED`` document, in the server's order."""
    if not isinstance(payment_required, dict):
        return []
    resource = payment_required.get("resource")
    offers = (SessionOffer.parse(r, resource) for r in payment_required.get("accepts") or [])
    return [o for o in offers if o is not None]


def new_salt() -> str:
    """A channel's salt: random, so that each channel this wallet opens has its own id."""
    return "0x" + os.urandom(32).hex()


def channel_config(payer: str, offer: SessionOffer, salt: str) -> ChannelConfig:
    """The channel ``payer`` opens for ``offer``: the payer signs its own vouchers (it is its own authorizer)."""
    return ChannelConfig(
        payer=payer.lower(),
        payer_authorizer=payer.lower(),
        receiver=offer.pay_to,
        receiver_authorizer=offer.receiver_authorizer,
        token=offer.asset,
        withdraw_delay=offer.withdraw_delay,
        salt=salt,
    )


def _hex(signature: bytes) -> str:
    return "0x" + signature.hex()


def sign_voucher(account: LocalAccount, channel_id: str, max_claimable: int, chain_id: int) -> dict[str, str]:
    """``Voucher(channelId, maxClaimableAmount)``: the receiver may claim up to ``max_claimable`` in all."""
    signed = account.unsafe_sign_hash(Hash32(voucher_digest(channel_id, max_claimable, chain_id)))
    return {
        "channelId": channel_id,
        "maxClaimableAmount": str(max_claimable),
        "signature": _hex(bytes(signed.signature)),
    }


def sign_deposit(
    account: LocalAccount, offer: SessionOffer, channel_id: str, amount: int, *, now: int | None = None
) -> dict[str, Any]:
    """A deposit's ``deposit`` object: an ERC-3009 ``ReceiveWithAuthorization`` of ``amount`` to the deposit
    collector, bound to this channel by its nonce and usable once (a fresh salt per deposit)."""
    now = int(time.time()) if now is None else now
    auth = DepositAuthorization(
        amount=amount,
        valid_after=0,
        valid_before=now + min(offer.max_timeout, MAX_VALIDITY_SECONDS),  # capped as an exact authorization is
        salt=new_salt(),
        signature=b"",
    )
    digest = receive_authorization_digest(
        token=offer.asset,
        token_name=offer.token_name,
        token_version=offer.token_version,
        chain_id=offer.chain_id,
        payer=account.address.lower(),
        auth=auth,
        channel=channel_id,
    )
    signature = bytes(account.unsafe_sign_hash(Hash32(digest)).signature)
    erc3009 = {
        "validAfter": str(auth.valid_after),
        "validBefore": str(auth.valid_before),
        "salt": auth.salt,
        "signature": _hex(signature),
    }
    return {"amount": str(amount), "authorization": {"erc3009Authorization": erc3009}}


def session_header(
    offer: SessionOffer,
    kind: Literal["deposit", "voucher", "refund"],
    config: ChannelConfig,
    voucher: dict[str, str],
    *,
    deposit: dict[str, Any] | None = None,
    refund_amount: int | None = None,
) -> str:
    """The ``PAYMENT-SIGNATURE`` value (x402 v2: the only version that knows the scheme)."""
    payload: dict[str, Any] = {"type": kind, "channelConfig": config.wire(), "voucher": voucher}
    if deposit is not None:
        payload["deposit"] = deposit
    if refund_amount is not None:
        payload["amount"] = str(refund_amount)
    doc: dict[str, Any] = {"x402Version": 2, "accepted": dict(offer.requirement), "payload": payload}
    if offer.resource:
        doc["resource"] = dict(offer.resource)
    return encode_header(doc)


def signed_by(address: str, channel_id: str, max_claimable: int, signature: str, chain_id: int) -> bool:
    """Is ``signature`` a voucher for (channel, max_claimable) by ``address``? (a corrective 402's proof)."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
    except ValueError:
        return False
    return recover_signer(voucher_digest(channel_id, max_claimable, chain_id), raw) == address.lower()


# ------------------------------------------------------------------------------------------------------ answers


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _uint(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit() and len(value) <= 78:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@dataclass(frozen=True, slots=True)
class SessionReceipt:
    """A session answer's ``PAYMENT-RESPONSE``; amounts None where absent or malformed."""

    success: bool
    transaction: str
    amount: int | None  # a deposit: what was deposited; a refund: what was returned
    charged: int | None  # ``extra.chargedAmount``: what this request cost
    cumulative: int | None  # ``extra.channelState.chargedCumulativeAmount``: the channel's total after it


def session_receipt(headers: Mapping[str, str] | Any) -> SessionReceipt | None:
    value = headers.get("payment-response")
    if not value:
        return None
    try:
        doc = decode_header(value)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    extra = _object(doc.get("extra"))
    state = _object(extra.get("channelState"))
    tx = doc.get("transaction")
    return SessionReceipt(
        success=doc.get("success") is True,
        transaction=tx if isinstance(tx, str) else "",
        amount=_uint(doc.get("amount")),
        charged=_uint(extra.get("chargedAmount")),
        cumulative=_uint(state.get("chargedCumulativeAmount")),
    )


@dataclass(frozen=True, slots=True)
class CorrectiveState:
    """What a corrective 402 says about a channel: the server's view, and the last voucher it holds (unverified:
    :func:`signed_by` must confirm it is the payer's own before it is believed)."""

    channel_id: str
    charged: int
    balance: int | None
    total_claimed: int | None
    signed_max: int | None
    signature: str | None


def corrective_state(payment_required: Any, channel_id: str) -> CorrectiveState | None:
    """The ``channelState`` / ``voucherState`` of the decoded 402 for ``channel_id``, or None."""
    if not isinstance(payment_required, dict):
        return None
    for req in payment_required.get("accepts") or []:
        extra = _object(_object(req).get("extra"))
        state = _object(extra.get("channelState"))
        if str(state.get("channelId", "")).lower() != channel_id:
            continue
        charged = _uint(state.get("chargedCumulativeAmount"))
        if charged is None:
            return None
        voucher = _object(extra.get("voucherState"))
        signature = voucher.get("signature")
        return CorrectiveState(
            channel_id=channel_id,
            charged=charged,
            balance=_uint(state.get("balance")),
            total_claimed=_uint(state.get("totalClaimed")),
            signed_max=_uint(voucher.get("signedMaxClaimable")),
            signature=signature if isinstance(signature, str) else None,
        )
    return None
