"""Stable, machine-readable refusal reasons.

Where the x402 reference implementation has a name for the same failure we use its string, so that clients and
dashboards that already know those names understand ours.
"""

from __future__ import annotations

PAYMENT_REQUIRED = "payment_required"
INVALID_PAYMENT_HEADER = "invalid_payment_header"
PAYMENT_HEADER_TOO_LARGE = "payment_header_too_large"
UNSUPPORTED_VERSION = "unsupported_x402_version"
UNSUPPORTED_SCHEME = "unsupported_scheme"
NETWORK_MISMATCH = "network_mismatch"
ASSET_MISMATCH = "invalid_exact_evm_asset_mismatch"
RECIPIENT_MISMATCH = "invalid_exact_evm_payload_recipient_mismatch"
VALUE_MISMATCH = "invalid_exact_evm_payload_authorization_value_mismatch"
VALID_AFTER_FUTURE = "invalid_exact_evm_payload_authorization_valid_after"
VALID_BEFORE_EXPIRED = "invalid_exact_evm_payload_authorization_valid_before"
VALID_BEFORE_TOO_FAR = "invalid_exact_evm_payload_authorization_valid_before_too_far"
INVALID_SIGNATURE = "invalid_exact_evm_payload_signature"
UNDEPLOYED_SMART_WALLET = "invalid_exact_evm_payload_undeployed_smart_wallet"
NONCE_ALREADY_USED = "invalid_exact_evm_nonce_already_used"
INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
SIMULATION_FAILED = "invalid_exact_evm_transaction_simulation_failed"
TRANSACTION_FAILED = "transaction_failed"
SETTLEMENT_PENDING = "settlement_pending"
TRANSFER_EVENT_MISMATCH = "invalid_exact_evm_transfer_event_mismatch"
PAYMENT_ALREADY_USED = "payment_already_used"
PAYMENT_IN_FLIGHT = "payment_in_flight"
UNSUPPORTED_PAYMENT_KIND = "unsupported_payment_kind"
