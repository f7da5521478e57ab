"""Our own ``batch-settlement`` payloads, signed with eth_account's EIP-712 encoder (not the gateway's digests), so
that tests can send exactly the voucher, deposit or refund an attacker or a confused client would.

    ch = CraftedChannel.from_offer(payer, offer)            # offer: the 402's batch-settlement accepts entry
    ch.header(ch.deposit(100_000, voucher_max=1_000))      # open the channel, pay the first request
    ch.header(ch.voucher(2_000))                           # the next one (cumulative)

Every builder takes overrides, so one field at a time can be made wrong.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from gateway.dev.chain import BATCH_SETTLEMENT_ADDRESS, ERC3009_DEPOSIT_COLLECTOR_ADDRESS, DevChain
from gateway.dev.transactions import send_transaction
from gateway.x402.codec import decode_header, encode_header
from tests.e2e.craft import EIP712_DOMAIN

SCHEME = "batch-settlement"
_DOMAIN_TYPE = EIP712_DOMAIN
_CONFIG_TYPE = [
    {"name": "payer", "type": "address"},
    {"name": "payerAuthorizer", "type": "address"},
    {"name": "receiver", "type": "address"},
    {"name": "receiverAuthorizer", "type": "address"},
    {"name": "token", "type": "address"},
    {"name": "withdrawDelay", "type": "uint40"},
    {"name": "salt", "type": "bytes32"},
]
_VOUCHER_TYPE = [{"name": "channelId", "type": "bytes32"}, {"name": "maxClaimableAmount", "type": "uint128"}]
_RECEIVE_TYPE = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


def _typed(domain: dict[str, Any], primary: str, fields: list[dict[str, str]], message: dict[str, Any]) -> Any:
    return encode_typed_data(
        full_message={
            "types": {"EIP712Domain": _DOMAIN_TYPE, primary: fields},
            "primaryType": primary,
            "domain": domain,
            "message": message,
        }
    )


def session_offer(response: httpx.Response) -> dict[str, Any]:
    """The batch-settlement entry of a 402's ``PAYMENT-REQUIRED`` header."""
    doc = decode_header(response.headers["payment-required"])
    return next(a for a in doc["accepts"] if a["scheme"] == SCHEME)


def corrective(response: httpx.Response) -> dict[str, Any]:
    """The corrective 402's batch-settlement ``extra`` (channelState, voucherState) and its ``error``."""
    doc = decode_header(response.headers["payment-required"])
    return {"error": doc.get("error"), **session_offer(response)["extra"]}


@dataclass(frozen=True)
class CraftedChannel:
    payer: LocalAccount
    offer: dict[str, Any]
    chain_id: int
    salt: str = field(default_factory=lambda: "0x" + os.urandom(32).hex())
    # ChannelConfig fields (checksummed addresses), from the offer unless overridden
    receiver: str = ""
    receiver_authorizer: str = ""
    token: str = ""
    withdraw_delay: int = 0
    payer_authorizer: str = ""

    @classmethod
    def from_offer(cls, payer: LocalAccount, offer: dict[str, Any], **overrides: Any) -> CraftedChannel:
        base = cls(
            payer=payer,
            offer=offer,
            chain_id=int(offer["network"].split(":")[1]),
            receiver=to_checksum_address(offer["payTo"]),
            receiver_authorizer=to_checksum_address(offer["extra"]["receiverAuthorizer"]),
            token=to_checksum_address(offer["asset"]),
            withdraw_delay=int(offer["extra"]["withdrawDelay"]),
            payer_authorizer=payer.address,
        )
        return replace(base, **overrides)

    # -------------------------------------------------------------------------------------------- the channel

    @property
    def domain(self) -> dict[str, Any]:
        return {
            "name": "x402 Batch Settlement",
            "version": "1",
            "chainId": self.chain_id,
            "verifyingContract": BATCH_SETTLEMENT_ADDRESS,
        }

    def config(self) -> dict[str, Any]:
        return {
            "payer": self.payer.address,
            "payerAuthorizer": self.payer_authorizer,
            "receiver": self.receiver,
            "receiverAuthorizer": self.receiver_authorizer,
            "token": self.token,
            "withdrawDelay": self.withdraw_delay,
            "salt": self.salt,
        }

    @property
    def id(self) -> str:
        message = {**self.config(), "salt": bytes.fromhex(self.salt[2:])}
        return "0x" + _hash_eip191_message(_typed(self.domain, "ChannelConfig", _CONFIG_TYPE, message)).hex()

    def abi_config(self) -> tuple[Any, ...]:
        c = self.config()
        return (
            c["payer"],
            c["payerAuthorizer"],
            c["receiver"],
            c["receiverAuthorizer"],
            c["token"],
            c["withdrawDelay"],
            bytes.fromhex(self.salt[2:]),
        )

    # ------------------------------------------------------------------------------------------- signed parts

    def voucher(
        self, max_claimable: int, *, signer: LocalAccount | None = None, channel_id: str | None = None
    ) -> dict[str, Any]:
        cid = channel_id or self.id
        signable = _typed(
            self.domain,
            "Voucher",
            _VOUCHER_TYPE,
            {"channelId": bytes.fromhex(cid[2:]), "maxClaimableAmount": max_claimable},
        )
        signature = (signer or self.payer).sign_message(signable).signature.to_0x_hex()
        return {"channelId": cid, "maxClaimableAmount": str(max_claimable), "signature": signature}

    def authorization(
        self,
        amount: int,
        *,
        valid_before: int | None = None,
        salt: str | None = None,
        signer: LocalAccount | None = None,
    ) -> dict[str, Any]:
        """The payer's ERC-3009 ``ReceiveWithAuthorization`` to the deposit collector for ``amount`` (signed by
        ``signer`` instead, to forge one)."""
        salt = salt or "0x" + os.urandom(32).hex()
        valid_before = int(time.time()) + 3600 if valid_before is None else valid_before
        nonce = keccak(bytes.fromhex(self.id[2:]) + bytes.fromhex(salt[2:]))
        extra = self.offer["extra"]
        signable = _typed(
            {
                "name": extra["name"],
                "version": extra["version"],
                "chainId": self.chain_id,
                "verifyingContract": to_checksum_address(self.offer["asset"]),
            },
            "ReceiveWithAuthorization",
            _RECEIVE_TYPE,
            {
                "from": self.payer.address,
                "to": ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
                "value": amount,
                "validAfter": 0,
                "validBefore": valid_before,
                "nonce": nonce,
            },
        )
        signature = (signer or self.payer).sign_message(signable).signature.to_0x_hex()
        return {
            "amount": str(amount),
            "authorization": {
                "erc3009Authorization": {
                    "validAfter": "0",
                    "validBefore": str(valid_before),
                    "salt": salt,
                    "signature": signature,
                }
            },
        }

    # ---------------------------------------------------------------------------------------------- payloads

    def deposit(self, amount: int, *, voucher_max: int, **auth: Any) -> dict[str, Any]:
        return self.deposit_with(self.authorization(amount, **auth), voucher_max=voucher_max)

    def deposit_with(self, authorization: dict[str, Any], *, voucher_max: int) -> dict[str, Any]:
        return {
            "type": "deposit",
            "channelConfig": self.config(),
            "voucher": self.voucher(voucher_max),
            "deposit": authorization,
        }

    def paying(self, max_claimable: int, **kw: Any) -> dict[str, Any]:
        """A voucher payload: this channel's config and a voucher for ``max_claimable``."""
        return {"type": "voucher", "channelConfig": self.config(), "voucher": self.voucher(max_claimable, **kw)}

    def refund(self, charged: int, amount: int | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"type": "refund", "channelConfig": self.config(), "voucher": self.voucher(charged)}
        if amount is not None:
            payload["amount"] = str(amount)
        return payload

    def header(self, payload: dict[str, Any]) -> dict[str, str]:
        """The request headers carrying ``payload`` (x402 v2 ``PAYMENT-SIGNATURE``)."""
        doc = {"x402Version": 2, "accepted": self.offer, "payload": payload}
        return {"PAYMENT-SIGNATURE": encode_header(doc)}

    # --------------------------------------------------------------------------------------------- on chain

    def onchain(self, chain: DevChain) -> Any:
        return chain.channel(bytes.fromhex(self.id[2:]))

    def call_as_payer(self, chain: DevChain, function: str, *args: Any) -> dict[str, Any]:
        """Send ``initiateWithdraw(config, amount)`` or ``finalizeWithdraw(config)`` as the payer (it pays gas)."""
        from eth_abi.abi import encode as abi_encode

        from gateway.dev.chain import set_eth_balance

        config_type = "(address,address,address,address,address,uint40,bytes32)"
        types = {"initiateWithdraw": [config_type, "uint128"], "finalizeWithdraw": [config_type]}[function]
        selector = keccak(text=f"{function}({','.join(types)})")[:4]
        data = selector + abi_encode(types, [self.abi_config(), *args])
        set_eth_balance(chain.anvil, self.payer.address, 10**18)
        return send_transaction(chain.anvil, "0x" + bytes(self.payer.key).hex(), BATCH_SETTLEMENT_ADDRESS, data)


def other_account() -> LocalAccount:
    acct: LocalAccount = Account.create()
    return acct
