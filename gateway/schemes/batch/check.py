"""The ``batch-settlement`` offer and every check of a session payment that needs no I/O (docs/sessions.md).

The offer is the route's price as the per-request ceiling, plus the terms every channel must carry: our receiver
(``payTo``), our receiver authorizer, the withdrawal delay and the smallest deposit. A payment is checked against
those terms, its channel id against its config, and its voucher's signature against the payer authorizer (an
ERC-1271 payer, whose authorizer is zero, is asked on chain later).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.config import GatewayConfig, RouteConfig
from gateway.errors import BadRequest, PaymentRequired
from gateway.storage.channels import MAX_AMOUNT
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.eip712 import recover_signer
from gateway.x402.sessions import (
    SCHEME,
    ZERO_ADDRESS,
    SessionPayment,
    channel_id,
    receive_authorization_digest,
    voucher_digest,
)

__all__ = ["CheckedPayment", "check_session_payment", "min_deposit", "session_requirements"]

# What the official server asks as a smallest deposit when none is configured: ten requests at the ceiling.
DEPOSIT_MULTIPLE = 10


def min_deposit(config: GatewayConfig, route: RouteConfig) -> int:
    return config.sessions.min_deposit or DEPOSIT_MULTIPLE * route.price


def session_requirements(
    config: GatewayConfig, route: RouteConfig, base: tuple[Requirement, ...], authorizer: str
) -> tuple[Requirement, ...]:
    """The route's batch-settlement offers, one per network (empty when the route does not offer sessions)."""
    if SCHEME not in route.schemes:
        return ()
    terms = (
        ("receiverAuthorizer", authorizer),
        ("withdrawDelay", config.sessions.withdraw_delay),
        ("minDeposit", str(min_deposit(config, route))),
    )
    return tuple(replace(r, scheme=SCHEME, more=terms, legacy=False) for r in base)


@dataclass(frozen=True, slots=True)
class CheckedPayment:
    payment: SessionPayment
    requirement: Requirement  # the offer it pays: ``amount`` is the per-request ceiling
    channel_id: str

    @property
    def payer(self) -> str:
        return self.payment.config.payer


def check_session_payment(
    payment: SessionPayment,
    offers: tuple[Requirement, ...],
    *,
    authorizer: str,
    withdraw_delay: int,
    deposit_floor: int,
    now: float,
    min_validity: int,
    clock_skew: int,
) -> CheckedPayment:
    """Raises the 402 (or 400) that names what is wrong; returns the payment bound to the offer it pays."""
    req = next((r for r in offers if r.matches_network(payment.network)), None)
    if req is None:
        raise PaymentRequired(
            f"no batch-settlement offer on network {payment.network[:40]!r}", reason=reasons.NETWORK_MISMATCH
        )
    cfg = payment.config
    if payment.voucher.max_claimable > MAX_AMOUNT:
        raise PaymentRequired(
            "the voucher's amount is beyond what a channel can hold here", reason=reasons.SESSION_VOUCHER_PAYLOAD
        )
    if payment.deposit is not None and payment.deposit.amount > MAX_AMOUNT:
        raise PaymentRequired(
            "the deposit's amount is beyond what a channel can hold here", reason=reasons.SESSION_DEPOSIT_PAYLOAD
        )
    if cfg.receiver != req.pay_to.lower():
        raise PaymentRequired("the channel's receiver is not this server's", reason=reasons.SESSION_RECEIVER_MISMATCH)
    if cfg.receiver_authorizer != authorizer.lower():
        raise PaymentRequired(
            "the channel's receiver authorizer is not this server's",
            reason=reasons.SESSION_RECEIVER_AUTHORIZER_MISMATCH,
        )
    if cfg.token != req.asset.lower():
        raise PaymentRequired("the channel's token is not the asset offered", reason=reasons.SESSION_TOKEN_MISMATCH)
    if cfg.withdraw_delay != withdraw_delay:
        raise PaymentRequired(
            f"the channel's withdrawDelay must be {withdraw_delay}", reason=reasons.SESSION_WITHDRAW_DELAY_MISMATCH
        )
    cid = channel_id(cfg, req.chain_id)
    if cid != payment.voucher.channel_id:
        raise PaymentRequired(
            "voucher.channelId is not the id of channelConfig", reason=reasons.SESSION_CHANNEL_ID_MISMATCH
        )
    if cfg.payer_authorizer == ZERO_ADDRESS:
        # A zero authorizer makes the payer's contract (ERC-1271, or code an EIP-7702 account delegates to) the
        # judge of every voucher, at claim time: it could accept a voucher now and reject its claim later, and
        # revert a whole claim batch. The official client always names an authorizer (docs/sessions.md).
        raise PaymentRequired(
            "a channel must name a payer authorizer (zero is not accepted here)",
            reason=reasons.SESSION_VOUCHER_SIGNATURE,
        )
    signer = recover_signer(voucher_digest(cid, payment.voucher.max_claimable, req.chain_id), payment.voucher.signature)
    if signer != cfg.payer_authorizer:
        raise PaymentRequired(
            "the voucher is not signed by the payer authorizer", reason=reasons.SESSION_VOUCHER_SIGNATURE
        )
    if payment.kind == "deposit":
        _check_deposit(payment, req, cid, deposit_floor, now, min_validity, clock_skew)
    elif payment.kind == "refund" and payment.refund_amount is not None and payment.refund_amount <= 0:
        raise BadRequest("a refund's amount must be positive", reason=reasons.SESSION_REFUND_AMOUNT_INVALID)
    return CheckedPayment(payment, req, cid)


def _check_deposit(
    payment: SessionPayment, req: Requirement, cid: str, floor: int, now: float, min_validity: int, skew: int
) -> None:
    dep = payment.deposit
    assert dep is not None
    if dep.amount < floor:
        raise PaymentRequired(
            f"a deposit must be at least {floor} atomic units", reason=reasons.SESSION_DEPOSIT_BELOW_MIN
        )
    if dep.valid_after > now + skew:
        raise PaymentRequired("the deposit authorization is not valid yet", reason=reasons.SESSION_DEPOSIT_VALID_AFTER)
    if dep.valid_before < now + min_validity:
        raise PaymentRequired("the deposit authorization expires too soon", reason=reasons.SESSION_DEPOSIT_VALID_BEFORE)
    digest = receive_authorization_digest(
        token=req.asset,
        token_name=req.eip712_name,
        token_version=req.eip712_version,
        chain_id=req.chain_id,
        payer=payment.config.payer,
        auth=dep,
        channel=cid,
    )
    if len(dep.signature) == 65 and recover_signer(digest, dep.signature) != payment.config.payer:
        # A 65-byte signature from an EOA payer must recover to it; a contract wallet's longer signature is for the
        # token to check (ERC-1271), which the deposit's simulation does before anything is sent.
        raise PaymentRequired(
            "the deposit authorization is not signed by the payer", reason=reasons.SESSION_DEPOSIT_SIGNATURE
        )
