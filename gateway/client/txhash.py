"""Client side of tx-hash proofs: sign the binding that makes a public transaction hash spendable only by its
sender (see :mod:`gateway.x402.txhash` for the message)."""

from __future__ import annotations

from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from gateway.x402.txhash import BINDING_HEADER, NETWORK_HEADER, binding_message


def tx_proof_headers(account: LocalAccount, tx_hash: str, network: str, method: str, resource: str) -> dict[str, str]:
    """The three headers that present ``tx_hash`` (a USDC transfer sent by ``account``) as payment for
    ``method resource`` (the resource URL exactly as the 402 advertised it)."""
    message = binding_message(tx_hash, network, method.upper(), resource)
    signed = account.sign_message(encode_defunct(text=message))
    return {
        "X-PAYMENT": tx_hash.lower(),
        NETWORK_HEADER: network,
        BINDING_HEADER: "0x" + bytes(signed.signature).hex(),
    }
