// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IDepositCollector} from "./IDepositCollector.sol";

/// @title X402BatchSettlement - payment channels of the x402 `batch-settlement` scheme, for the local dev chain.
/// @notice Written for this project with the external interface of the official `x402BatchSettlement`
/// (functions, events, custom errors, EIP-712 types and domain) so that the official client and facilitator
/// work against it unchanged. docs/sessions.md ("Contracts in the dev kit") describes it.
///
/// A channel is identified by the EIP-712 hash of its immutable `ChannelConfig` under this contract's domain.
/// The payer deposits once (through a collector); the receiver side then claims cumulative, payer-signed vouchers
/// (`claim`, or `claimWithSignature` relayed by anyone with the receiver authorizer's `ClaimBatch` signature);
/// claims only move accounting, and `settle` sweeps everything claimed for a (receiver, token) pair in one
/// transfer. Unclaimed escrow goes back to the payer by a cooperative refund (receiver side, or its authorizer's
/// `Refund` signature bound to `refundNonce`) or by the payer's timed withdrawal (`withdrawDelay`, 15 min..30 days).
///
/// @dev No immutables and no constructor: the EIP-712 domain separator is computed from `block.chainid` and
/// `address(this)` on every call, so the runtime code copied with `anvil_setCode` to the canonical address
/// verifies the signatures the official client makes for that address. Transient-storage reentrancy guard
/// (EIP-1153, evmVersion cancun).
contract X402BatchSettlement {
    // ------------------------------------------------------------------------------------------------ types
    struct ChannelConfig {
        address payer;
        address payerAuthorizer; // EOA that signs vouchers; zero: the payer signs (ECDSA or ERC-1271)
        address receiver;
        address receiverAuthorizer; // signs claim batches and refunds; never zero
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    struct ChannelState {
        uint128 balance; // escrowed: deposits minus refunds and withdrawals (claimed funds stay until settled)
        uint128 totalClaimed; // cumulative, monotonic
    }

    struct WithdrawalState {
        uint128 amount;
        uint40 initiatedAt; // zero: none pending
    }

    struct ReceiverState {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed; // cumulative, not a delta: replaying an applied claim changes nothing
    }

    // ------------------------------------------------------------------------------------------------ constants
    uint40 public constant MIN_WITHDRAW_DELAY = 15 minutes;
    uint40 public constant MAX_WITHDRAW_DELAY = 30 days;

    bytes32 public constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 public constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 public constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 public constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );

    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    string private constant _NAME = "x402 Batch Settlement";
    string private constant _VERSION = "1";
    bytes32 private constant _HASHED_NAME = keccak256(bytes(_NAME));
    bytes32 private constant _HASHED_VERSION = keccak256(bytes(_VERSION));
    // secp256k1n / 2: a signature with a larger s is the malleable twin of a valid one (EIP-2).
    uint256 private constant _HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    bytes4 private constant _ERC1271_MAGIC = 0x1626ba7e; // isValidSignature(bytes32,bytes)

    // ------------------------------------------------------------------------------------------------ storage
    mapping(bytes32 channelId => ChannelState) public channels;
    /// @notice The nonce the next `refundWithSignature` must carry; every executed refund (either path) bumps it.
    mapping(bytes32 channelId => uint256) public refundNonce;
    mapping(bytes32 channelId => WithdrawalState) public pendingWithdrawals;
    mapping(address receiver => mapping(address token => ReceiverState)) public receivers;

    bool private transient _entered;

    // ------------------------------------------------------------------------------------------------ events
    event ChannelCreated(bytes32 indexed channelId, ChannelConfig config);
    event ChannelClosed(bytes32 indexed channelId, ChannelConfig config);
    event Deposited(bytes32 indexed channelId, address indexed sender, uint128 amount, uint128 newBalance);
    event Claimed(bytes32 indexed channelId, address indexed sender, uint128 claimAmount, uint128 newTotalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event Refunded(bytes32 indexed channelId, address indexed sender, uint128 amount);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 finalizeAfter);
    event WithdrawFinalized(bytes32 indexed channelId, address indexed sender, uint128 amount);
    /// @notice ERC-5267's event, declared for interface parity; the domain is derived, never set, so it is
    /// never emitted.
    event EIP712DomainChanged();

    // ------------------------------------------------------------------------------------------------ errors
    error InvalidChannel();
    error ZeroDeposit();
    error DepositOverflow();
    error InvalidSignature();
    error NotReceiverAuthorizer();
    error NotAuthorizedToClaim();
    error NotAuthorizedToRefund();
    error ClaimExceedsCeiling();
    error ClaimExceedsBalance();
    error WithdrawalAlreadyPending();
    error WithdrawalNotPending();
    error NotAuthorizedToFinalizeWithdraw();
    error WithdrawDelayNotElapsed();
    error NothingToWithdraw();
    error WithdrawAmountExceedsAvailable();
    error WithdrawDelayOutOfRange();
    error EmptyBatch();
    error DepositCollectionFailed();
    error InvalidCollector();
    error InvalidRefundNonce();
    error ZeroRefund();
    // The errors the official contract inherits from its libraries (same names and arguments), so that callers
    // decoding reverts see the same selectors.
    error ReentrancyGuardReentrantCall();
    error SafeERC20FailedOperation(address token);
    error ECDSAInvalidSignature();
    error ECDSAInvalidSignatureLength(uint256 length);
    error ECDSAInvalidSignatureS(bytes32 s);
    error FailedCall();

    modifier nonReentrant() {
        if (_entered) revert ReentrancyGuardReentrantCall();
        _entered = true;
        _;
        _entered = false;
    }

    // ------------------------------------------------------------------------------------------------ deposits
    /// @notice Escrow `amount` for the channel of `config`, pulled from the payer by `collector`. Anyone may call:
    /// the collector only moves what the payer authorized, and this contract checks it received exactly `amount`.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        if (
            config.payer == address(0) || config.receiver == address(0) || config.receiverAuthorizer == address(0)
                || config.token == address(0)
        ) revert InvalidChannel();
        if (config.withdrawDelay < MIN_WITHDRAW_DELAY || config.withdrawDelay > MAX_WITHDRAW_DELAY) {
            revert WithdrawDelayOutOfRange();
        }
        if (amount == 0) revert ZeroDeposit();
        if (collector == address(0)) revert InvalidCollector();

        bytes32 channelId = _channelId(config, _domainSeparator());
        ChannelState storage ch = channels[channelId];
        uint128 previous = ch.balance;
        if (amount > type(uint128).max - previous) revert DepositOverflow();
        uint128 newBalance = previous + amount;
        ch.balance = newBalance; // effects before the collector's external calls

        address token = config.token;
        uint256 held = _balanceOf(token);
        IDepositCollector(collector).collect(config.payer, token, amount, channelId, collectorData);
        // Post-condition, not trust in the collector: a short or fee-on-transfer pull reverts the deposit.
        if (_balanceOf(token) != held + amount) revert DepositCollectionFailed();

        if (previous == 0 && ch.totalClaimed == 0) emit ChannelCreated(channelId, config);
        emit Deposited(channelId, msg.sender, amount, newBalance);
    }

    // ------------------------------------------------------------------------------------------------ claims
    /// @notice Apply voucher claims; the caller must be the receiver or the receiver authorizer of every row.
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyBatch();
        bytes32 ds = _domainSeparator();
        for (uint256 i = 0; i < n; ++i) {
            ChannelConfig calldata c = voucherClaims[i].voucher.channel;
            if (msg.sender != c.receiverAuthorizer && msg.sender != c.receiver) revert NotAuthorizedToClaim();
            _applyClaim(voucherClaims[i], _channelId(c, ds), ds);
        }
    }

    /// @notice Apply voucher claims relayed by anyone, authorized by the receiver authorizer's signature over the
    /// EIP-712 `ClaimBatch` of all rows; every row must name the same receiver authorizer.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyBatch();
        bytes32 ds = _domainSeparator();
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        // Channel ids are computed once, for the batch digest, and reused for the rows.
        (bytes32 digest, bytes32[] memory ids) = _claimBatchDigest(voucherClaims, ds);
        if (!_isValidSignatureNow(authorizer, digest, authorizerSignature)) revert InvalidSignature();
        for (uint256 i = 0; i < n; ++i) {
            if (voucherClaims[i].voucher.channel.receiverAuthorizer != authorizer) revert NotReceiverAuthorizer();
            _applyClaim(voucherClaims[i], ids[i], ds);
        }
    }

    /// @notice Transfer everything claimed and not yet settled for (`receiver`, `token`) to `receiver`.
    /// Permissionless; a no-op when nothing is pending.
    function settle(address receiver, address token) external nonReentrant {
        ReceiverState storage rs = receivers[receiver][token];
        uint128 claimed = rs.totalClaimed;
        uint128 amount = claimed - rs.totalSettled;
        if (amount == 0) return;
        rs.totalSettled = claimed;
        _safeTransfer(token, receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // ------------------------------------------------------------------------------------------------ withdrawal
    /// @notice Start the payer's timed withdrawal of up to `amount` of unclaimed escrow. Vouchers not yet claimed
    /// reserve nothing: the receiver side must claim them before `finalizeWithdraw` can run.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (msg.sender != config.payer && msg.sender != config.payerAuthorizer) revert InvalidChannel();
        if (amount == 0) revert NothingToWithdraw();
        bytes32 channelId = _channelId(config, _domainSeparator());
        WithdrawalState storage ws = pendingWithdrawals[channelId];
        if (ws.initiatedAt != 0) revert WithdrawalAlreadyPending();
        ChannelState storage ch = channels[channelId];
        if (amount > ch.balance - ch.totalClaimed) revert WithdrawAmountExceedsAvailable();
        uint40 now40 = uint40(block.timestamp);
        ws.amount = amount;
        ws.initiatedAt = now40;
        emit WithdrawInitiated(channelId, amount, now40 + config.withdrawDelay);
    }

    /// @notice After `withdrawDelay`, pay the pending withdrawal to the payer, capped at the escrow still
    /// unclaimed now (claims that landed in the meantime win).
    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        if (msg.sender != config.payer && msg.sender != config.payerAuthorizer) {
            revert NotAuthorizedToFinalizeWithdraw();
        }
        bytes32 channelId = _channelId(config, _domainSeparator());
        WithdrawalState storage ws = pendingWithdrawals[channelId];
        uint40 initiatedAt = ws.initiatedAt;
        if (initiatedAt == 0) revert WithdrawalNotPending();
        if (block.timestamp < uint256(initiatedAt) + uint256(config.withdrawDelay)) revert WithdrawDelayNotElapsed();

        ChannelState storage ch = channels[channelId];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 amount = ws.amount < available ? ws.amount : available;
        delete pendingWithdrawals[channelId];
        ch.balance -= amount;

        emit WithdrawFinalized(channelId, msg.sender, amount);
        if (ch.balance == 0 && ch.totalClaimed == 0) emit ChannelClosed(channelId, config);
        if (amount > 0) _safeTransfer(config.token, config.payer, amount);
    }

    // ------------------------------------------------------------------------------------------------ refunds
    /// @notice Cooperative refund by the receiver or its authorizer: up to `amount` of unclaimed escrow.
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (msg.sender != config.receiverAuthorizer && msg.sender != config.receiver) revert NotAuthorizedToRefund();
        _refund(config, _channelId(config, _domainSeparator()), amount);
    }

    /// @notice Cooperative refund relayed by anyone with the receiver authorizer's EIP-712 `Refund` signature for
    /// the channel's current `refundNonce`: each signature refunds once.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 ds = _domainSeparator();
        bytes32 channelId = _channelId(config, ds);
        if (nonce != refundNonce[channelId]) revert InvalidRefundNonce();
        bytes32 digest =
            _typedDataHash(ds, _hash4(REFUND_TYPEHASH, channelId, bytes32(nonce), bytes32(uint256(amount))));
        if (!_isValidSignatureNow(config.receiverAuthorizer, digest, receiverAuthorizerSignature)) {
            revert InvalidSignature();
        }
        _refund(config, channelId, amount);
    }

    // ------------------------------------------------------------------------------------------------ batching
    /// @notice Run several calls to this contract in one transaction (each under the reentrancy guard); the first
    /// failure reverts them all with its own revert data.
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i = 0; i < data.length; ++i) {
            (bool ok, bytes memory ret) = address(this).delegatecall(data[i]);
            if (!ok) {
                if (ret.length == 0) revert FailedCall();
                assembly ("memory-safe") {
                    revert(add(ret, 0x20), mload(ret))
                }
            }
            results[i] = ret;
        }
    }

    // ------------------------------------------------------------------------------------------------ views
    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _channelId(config, _domainSeparator());
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _voucherDigest(_domainSeparator(), channelId, maxClaimableAmount);
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _typedDataHash(
            _domainSeparator(), _hash4(REFUND_TYPEHASH, channelId, bytes32(nonce), bytes32(uint256(amount)))
        );
    }

    /// @notice The digest `claimWithSignature` checks; defined for an empty batch too (its array hash is
    /// keccak256("")), which the claim functions themselves refuse.
    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) public view returns (bytes32) {
        (bytes32 digest,) = _claimBatchDigest(voucherClaims, _domainSeparator());
        return digest;
    }

    /// @notice ERC-5267: the EIP-712 domain (name, version, chainId, verifyingContract).
    function eip712Domain()
        external
        view
        returns (
            bytes1 fields,
            string memory name,
            string memory version,
            uint256 chainId,
            address verifyingContract,
            bytes32 salt,
            uint256[] memory extensions
        )
    {
        return (hex"0f", _NAME, _VERSION, block.chainid, address(this), bytes32(0), new uint256[](0));
    }

    // ------------------------------------------------------------------------------------------------ internals
    function _applyClaim(VoucherClaim calldata vc, bytes32 channelId, bytes32 ds) private {
        ChannelState storage ch = channels[channelId];
        uint128 claimedBefore = ch.totalClaimed;
        uint128 target = vc.totalClaimed;
        if (target <= claimedBefore) return; // already applied (or superseded): nothing to do, nothing to check
        uint128 ceiling = vc.voucher.maxClaimableAmount;
        if (target > ceiling) revert ClaimExceedsCeiling();
        if (target > ch.balance) revert ClaimExceedsBalance();

        ChannelConfig calldata c = vc.voucher.channel;
        bytes32 digest = _voucherDigest(ds, channelId, ceiling);
        address payerAuthorizer = c.payerAuthorizer;
        if (payerAuthorizer != address(0)) {
            // A committed voucher key: plain ECDSA, malformed signatures revert with the ECDSA errors.
            if (_recover(digest, vc.signature) != payerAuthorizer) revert InvalidSignature();
        } else if (!_isValidSignatureNow(c.payer, digest, vc.signature)) {
            revert InvalidSignature();
        }

        uint128 delta = target - claimedBefore;
        ch.totalClaimed = target;
        receivers[c.receiver][c.token].totalClaimed += delta;
        emit Claimed(channelId, msg.sender, delta, target);
    }

    /// @dev The nonce advances before the cap is applied, so even a refund that moves nothing consumes it.
    function _refund(ChannelConfig calldata config, bytes32 channelId, uint128 amount) private {
        if (amount == 0) revert ZeroRefund();
        unchecked {
            ++refundNonce[channelId];
        }
        ChannelState storage ch = channels[channelId];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 refunded = amount < available ? amount : available;
        if (refunded == 0) return;
        ch.balance -= refunded;

        // A pending withdrawal shrinks by what the refund already returned (and ends when covered).
        WithdrawalState storage ws = pendingWithdrawals[channelId];
        if (ws.initiatedAt != 0) {
            if (refunded >= ws.amount) delete pendingWithdrawals[channelId];
            else ws.amount -= refunded;
        }

        emit Refunded(channelId, msg.sender, refunded);
        if (ch.balance == 0 && ch.totalClaimed == 0) emit ChannelClosed(channelId, config);
        _safeTransfer(config.token, config.payer, refunded);
    }

    function _claimBatchDigest(VoucherClaim[] calldata claims, bytes32 ds)
        private
        pure
        returns (bytes32 digest, bytes32[] memory ids)
    {
        uint256 n = claims.length;
        ids = new bytes32[](n);
        bytes32[] memory entries = new bytes32[](n);
        for (uint256 i = 0; i < n; ++i) {
            bytes32 id = _channelId(claims[i].voucher.channel, ds);
            ids[i] = id;
            entries[i] = _hash4(
                CLAIM_ENTRY_TYPEHASH,
                id,
                bytes32(uint256(claims[i].voucher.maxClaimableAmount)),
                bytes32(uint256(claims[i].totalClaimed))
            );
        }
        bytes32 entriesHash; // EIP-712 array: keccak256 of the concatenated element hashes
        assembly ("memory-safe") {
            entriesHash := keccak256(add(entries, 0x20), mul(n, 0x20))
        }
        digest = _typedDataHash(ds, _hash2(CLAIM_BATCH_TYPEHASH, entriesHash));
    }

    function _domainSeparator() private view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, _HASHED_NAME, _HASHED_VERSION, block.chainid, address(this)));
    }

    /// @dev hashStruct(ChannelConfig) straight from calldata, then the typed-data hash. Rejects the dirty high bits
    /// the ABI decoder would reject, so an id is only ever computed from a well-formed config.
    function _channelId(ChannelConfig calldata c, bytes32 ds) private pure returns (bytes32) {
        bytes32 typeHash = CHANNEL_CONFIG_TYPEHASH;
        bytes32 structHash;
        assembly ("memory-safe") {
            let p := mload(0x40) // scratch above the free pointer, never allocated
            mstore(p, typeHash)
            calldatacopy(add(p, 0x20), c, 0xe0)
            let dirty := or(shr(160, mload(add(p, 0x20))), shr(160, mload(add(p, 0x40))))
            dirty := or(dirty, or(shr(160, mload(add(p, 0x60))), shr(160, mload(add(p, 0x80)))))
            dirty := or(dirty, or(shr(160, mload(add(p, 0xa0))), shr(40, mload(add(p, 0xc0)))))
            if dirty { revert(0, 0) }
            structHash := keccak256(p, 0x100)
        }
        return _typedDataHash(ds, structHash);
    }

    function _voucherDigest(bytes32 ds, bytes32 channelId, uint128 maxClaimableAmount) private pure returns (bytes32) {
        return _typedDataHash(ds, _hash3(VOUCHER_TYPEHASH, channelId, bytes32(uint256(maxClaimableAmount))));
    }

    // The hashes below use memory above the free pointer as scratch and allocate nothing, so a claim batch's
    // memory (and its quadratic cost) does not grow with every row.
    function _typedDataHash(bytes32 ds, bytes32 structHash) private pure returns (bytes32 digest) {
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, 0x1901)
            mstore(add(p, 0x20), ds)
            mstore(add(p, 0x40), structHash)
            digest := keccak256(add(p, 0x1e), 0x42) // "\x19\x01" || domainSeparator || structHash
        }
    }

    function _hash2(bytes32 a, bytes32 b) private pure returns (bytes32 h) {
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, a)
            mstore(add(p, 0x20), b)
            h := keccak256(p, 0x40)
        }
    }

    function _hash3(bytes32 a, bytes32 b, bytes32 c) private pure returns (bytes32 h) {
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, a)
            mstore(add(p, 0x20), b)
            mstore(add(p, 0x40), c)
            h := keccak256(p, 0x60)
        }
    }

    function _hash4(bytes32 a, bytes32 b, bytes32 c, bytes32 d) private pure returns (bytes32 h) {
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, a)
            mstore(add(p, 0x20), b)
            mstore(add(p, 0x40), c)
            mstore(add(p, 0x60), d)
            h := keccak256(p, 0x80)
        }
    }

    /// @dev ECDSA recovery that reverts on a malformed signature: exactly 65 bytes r || s || v, low s, and a
    /// non-zero signer.
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address signer) {
        if (signature.length != 65) revert ECDSAInvalidSignatureLength(signature.length);
        (bytes32 r, bytes32 s, uint8 v) = _split(signature);
        if (uint256(s) > _HALF_N) revert ECDSAInvalidSignatureS(s);
        signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert ECDSAInvalidSignature();
    }

    /// @dev SignatureChecker semantics: an account without code is checked with ECDSA (a malformed signature is
    /// simply invalid), an account with code is asked (ERC-1271), never both.
    function _isValidSignatureNow(address signer, bytes32 digest, bytes calldata signature)
        private
        view
        returns (bool)
    {
        if (signer.code.length == 0) {
            if (signature.length != 65) return false;
            (bytes32 r, bytes32 s, uint8 v) = _split(signature);
            if (uint256(s) > _HALF_N) return false;
            address recovered = ecrecover(digest, v, r, s);
            return recovered != address(0) && recovered == signer;
        }
        bytes memory data = abi.encodeWithSelector(_ERC1271_MAGIC, digest, signature);
        bytes32 magic = bytes32(_ERC1271_MAGIC);
        bool valid;
        assembly ("memory-safe") {
            // Only the first return word is read: a wallet cannot make this copy an arbitrarily large return.
            let ok := staticcall(gas(), signer, add(data, 0x20), mload(data), 0x00, 0x20)
            valid := and(and(ok, gt(returndatasize(), 0x1f)), eq(mload(0x00), magic))
        }
        return valid;
    }

    function _split(bytes calldata signature) private pure returns (bytes32 r, bytes32 s, uint8 v) {
        assembly ("memory-safe") {
            r := calldataload(signature.offset)
            s := calldataload(add(signature.offset, 0x20))
            v := byte(0, calldataload(add(signature.offset, 0x40)))
        }
    }

    function _balanceOf(address token) private view returns (uint256) {
        return IERC20Balance(token).balanceOf(address(this));
    }

    /// @dev SafeERC20 semantics: a reverting token's reason is passed on; no return data is accepted only from a
    /// contract; otherwise the first return word must be true.
    function _safeTransfer(address token, address to, uint256 value) private {
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSelector(IERC20Balance.transfer.selector, to, value));
        if (!ok) {
            assembly ("memory-safe") {
                revert(add(ret, 0x20), mload(ret))
            }
        }
        bool accepted = ret.length == 0 ? token.code.length > 0 : ret.length >= 32 && abi.decode(ret, (uint256)) == 1;
        if (!accepted) revert SafeERC20FailedOperation(token);
    }
}

interface IERC20Balance {
    function balanceOf(address account) external view returns (uint256);
    function transfer(address to, uint256 value) external returns (bool);
}
