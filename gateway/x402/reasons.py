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

# tx-hash proofs (docs/protocol.md §5)
TX_NOT_FOUND = "transaction_not_found"
TX_REVERTED = "transaction_reverted"
TX_NOT_FINAL = "transaction_not_final"
TX_TOO_OLD = "transaction_too_old"
TX_IN_FUTURE = "transaction_in_future"
TRANSFER_NOT_FOUND = "transfer_not_found"
AMOUNT_TOO_LOW = "transfer_amount_too_low"
BINDING_REQUIRED = "payment_binding_required"
BINDING_MISMATCH = "payment_binding_mismatch"
NETWORK_REQUIRED = "payment_network_required"

# The error tree's defaults (gateway/errors.py): one per class
INTERNAL_ERROR = "internal_error"
INVALID_CONFIG = "invalid_config"
BAD_REQUEST = "bad_request"
PAYLOAD_TOO_LARGE = "payload_too_large"
HEADERS_TOO_LARGE = "headers_too_large"
REQUEST_TIMEOUT = "request_timeout"
SERVICE_UNAVAILABLE = "service_unavailable"
STORE_UNAVAILABLE = "store_unavailable"
STORE_IDENTITY_LOST = "store_identity_lost"  # the store lost its records: payments wait for an operator
STORE_REPLICAS_BEHIND = "store_replicas_behind"  # too few replicas acknowledged a money-critical write in time
CHAIN_UNAVAILABLE = "chain_unavailable"
BAD_GATEWAY = "bad_gateway"
UPSTREAM_UNREACHABLE = "upstream_unreachable"
UPSTREAM_TIMEOUT = "upstream_timeout"
SETTLEMENT_FAILED = "settlement_failed"

# Requests the gateway does not pass on (payment middleware, proxy, discovery)
ROUTE_NOT_FOUND = "route_not_found"
ROUTE_PAUSED = "route_paused"  # the operator paused the route: 503 before any payment is taken (docs/operating.md)
RATE_LIMITED = "rate_limited"
METHOD_NOT_ALLOWED = "method_not_allowed"
INVALID_PATH = "invalid_path"
INVALID_HOST = "invalid_host"
AMBIGUOUS_CONTENT_LENGTH = "ambiguous_content_length"
INVALID_CONTENT_LENGTH = "invalid_content_length"
UNSUPPORTED_UPGRADE = "unsupported_upgrade"  # 400: an Upgrade offer (h2c, ...) with a body the parser would skip
UNSUPPORTED_TRANSFER_CODING = "unsupported_transfer_coding"  # 501: a coding besides chunked (RFC 9112 6.1)

# Idempotent retries (the Idempotency-Key header)
INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
IDEMPOTENCY_KEY_IN_FLIGHT = "idempotency_key_in_flight"

# Jobs (billing that follows the job; a fronted jobs API's answers)
JOB_CALL_NOT_OFFERED = "job_call_not_offered"
JOB_ID_REUSED = "job_id_reused"
JOB_STORE_FULL = "job_store_full"
UPSTREAM_ANSWER_UNREADABLE = "upstream_answer_unreadable"
UPSTREAM_ANSWER_TOO_LARGE = "upstream_answer_too_large"
UPSTREAM_JOB_ID_MISSING = "upstream_job_id_missing"
PAYER_AUTH_REQUIRED = "payer_auth_required"  # list without X-Payer-Auth
PAYER_AUTH_MALFORMED = "payer_auth_malformed"
PAYER_AUTH_EXPIRED = "payer_auth_expired"
PAYER_AUTH_WRONG_MESSAGE = "payer_auth_wrong_message"  # the payer's key signed a near-miss of the message

# Chain access, relayer and facilitator (the metrics count a reason starting with ``rpc_`` as an RPC failure)
CHAIN_ID_MISMATCH = "chain_id_mismatch"
RPC_NO_QUORUM = "rpc_no_quorum"
RPC_DISAGREEMENT = "rpc_disagreement"
RELAYER_REFUSED = "relayer_refused"
SHUTTING_DOWN = "shutting_down"
FACILITATOR_UNAVAILABLE = "facilitator_unavailable"
FACILITATOR_BAD_ANSWER = "facilitator_bad_answer"
FACILITATOR_REJECTED = "facilitator_rejected"

# Pricing holds on every path (issue "Money invariants under attack and under faults", items 8-13)
AMBIGUOUS_PATH = "ambiguous_path"  # the path means different routes to different upstream frameworks

# Slow or hostile clients never starve paying ones (issue "Money invariants under attack and under faults", items
# 14-16)
TOO_MANY_UPLOADS = "too_many_uploads"  # the client's bodies still streaming up hold all the connections it may use

# The operator's side (the admin API, docs/operating.md)
PAYER_DENIED = "payer_denied"  # the payer is on the deny-list: refused before anything settles, nothing charged
ADMIN_TOKEN_REQUIRED = "admin_token_required"  # noqa: S105 - 401: no admin token, or not a configured one
ADMIN_TOKEN_READ_ONLY = "admin_token_read_only"  # noqa: S105 - 403: a read token asked for an action
ADMIN_CROSS_SITE = "admin_cross_site"  # 403: an action sent by a page of another origin (a browser's CSRF)
NOT_FOUND = "not_found"  # no such admin path
NOT_CONFIGURED = "not_configured"  # an admin action this gateway is not set up for (no refund key, no reloader)
PAYMENT_NOT_FOUND = "payment_not_found"  # no ledger entry with this key
PAYMENT_NOT_REFUNDABLE = "payment_not_refundable"  # a refund, a zero amount, or a network / asset not configured
PAYMENT_ALREADY_REFUNDED = "payment_already_refunded"  # 409: refunded before; nothing sent again
REFUND_IN_PROGRESS = "refund_in_progress"  # this payment's refund is being sent by another call
REFUND_FAILED = "refund_failed"  # nothing moved (the refund wallet is short), or the outcome is not known yet
PAYMENT_SETTLEMENT_LOST = "payment_settlement_lost"  # 409: a reorg lost its settlement: the money never came in

# Sessions: the ``batch-settlement`` scheme (docs/sessions.md). The official client acts on these strings (it
# resynchronises on a cumulative mismatch), so they are the x402 reference names.
SESSION_PAYLOAD_TYPE = "invalid_batch_settlement_evm_payload_type"
SESSION_CHANNEL_ID_MISMATCH = "invalid_batch_settlement_evm_channel_id_mismatch"
SESSION_RECEIVER_MISMATCH = "invalid_batch_settlement_evm_receiver_mismatch"
SESSION_RECEIVER_AUTHORIZER_MISMATCH = "invalid_batch_settlement_evm_receiver_authorizer_mismatch"
SESSION_TOKEN_MISMATCH = "invalid_batch_settlement_evm_token_mismatch"  # noqa: S105 - a reason, not a secret
SESSION_WITHDRAW_DELAY_MISMATCH = "invalid_batch_settlement_evm_withdraw_delay_mismatch"
SESSION_VOUCHER_SIGNATURE = "invalid_batch_settlement_evm_voucher_signature"
SESSION_VOUCHER_PAYLOAD = "invalid_batch_settlement_evm_voucher_payload"
SESSION_DEPOSIT_PAYLOAD = "invalid_batch_settlement_evm_deposit_payload"
SESSION_DEPOSIT_BELOW_MIN = "invalid_batch_settlement_evm_deposit_below_min_deposit"
SESSION_DEPOSIT_SIGNATURE = "invalid_batch_settlement_evm_receive_authorization_signature"
SESSION_DEPOSIT_VALID_AFTER = "invalid_batch_settlement_evm_payload_authorization_valid_after"
SESSION_DEPOSIT_VALID_BEFORE = "invalid_batch_settlement_evm_payload_authorization_valid_before"
SESSION_DEPOSIT_SIMULATION_FAILED = "invalid_batch_settlement_evm_deposit_simulation_failed"
SESSION_DEPOSIT_FAILED = "invalid_batch_settlement_evm_deposit_transaction_failed"
SESSION_CHANNEL_NOT_FOUND = "invalid_batch_settlement_evm_channel_not_found"
SESSION_CHANNEL_BUSY = "invalid_batch_settlement_evm_channel_busy"
SESSION_CUMULATIVE_MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"
SESSION_CUMULATIVE_BELOW_CLAIMED = "invalid_batch_settlement_evm_cumulative_below_claimed"
SESSION_CUMULATIVE_EXCEEDS_BALANCE = "invalid_batch_settlement_evm_cumulative_exceeds_balance"
SESSION_WITHDRAWING = "invalid_batch_settlement_evm_withdrawal_pending"  # ours: the channel is closing too soon
SESSION_REFUND_NO_BALANCE = "invalid_batch_settlement_evm_refund_no_balance"
SESSION_REFUND_AMOUNT_INVALID = "invalid_batch_settlement_evm_refund_amount_invalid"
SESSION_REFUND_FAILED = "invalid_batch_settlement_evm_refund_transaction_failed"
SESSION_METER_INVALID = "metered_charge_invalid"  # ours: the upstream reported a usage we cannot charge
