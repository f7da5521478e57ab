// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IDepositCollector, IERC3009Receive} from "./IDepositCollector.sol";

/// @title ERC3009DepositCollector - pulls a channel deposit with the payer's EIP-3009 `receiveWithAuthorization`.
/// @notice Written for this project with the external interface of the official collector. EIP-3009's
/// `receiveWithAuthorization` must be called by its payee (`to == msg.sender`), so the payer authorizes a
/// transfer to this collector, which forwards the funds to the settlement contract in the same call. The
/// authorization's nonce is `keccak256(abi.encode(channelId, salt))`: a signature is bound to one channel, and
/// the token's nonce bookkeeping makes it usable once.
/// @dev Only the settlement contract may call `collect`, so nobody can spend a payer's authorization outside a
/// deposit that credits the payer's channel. The settlement address is an immutable: the dev kit derives the
/// runtime code by running this constructor with the canonical settlement address (docs/sessions.md).
contract ERC3009DepositCollector is IDepositCollector {
    address public immutable x402BatchSettlement;

    error OnlyX402BatchSettlement();
    error InvalidX402BatchSettlementAddress();
    error SafeERC20FailedOperation(address token);

    constructor(address settlement) {
        if (settlement == address(0)) revert InvalidX402BatchSettlementAddress();
        x402BatchSettlement = settlement;
    }

    /// @param collectorData `abi.encode(uint256 validAfter, uint256 validBefore, uint256 salt, bytes signature)`
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external
    {
        address settlement = x402BatchSettlement;
        if (msg.sender != settlement) revert OnlyX402BatchSettlement();
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(collectorData, (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        IERC3009Receive(token).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, nonce, signature
        );
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSelector(0xa9059cbb, settlement, amount)); // transfer
        if (!ok) {
            assembly ("memory-safe") {
                revert(add(ret, 0x20), mload(ret))
            }
        }
        if (ret.length == 0 ? token.code.length == 0 : ret.length < 32 || abi.decode(ret, (uint256)) != 1) {
            revert SafeERC20FailedOperation(token);
        }
    }
}
