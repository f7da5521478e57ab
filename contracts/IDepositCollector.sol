// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IDepositCollector - how X402BatchSettlement pulls a deposit from a payer.
/// @notice A collector moves exactly `amount` of `token` from `payer` to its caller (the settlement contract),
/// by whatever authorization `collectorData` carries. The settlement contract checks its own token balance
/// before and after, so a collector that pulls less (or nothing) makes the deposit revert.
interface IDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external;
}

/// @notice The EIP-3009 call a collector makes: the `bytes signature` overload (FiatToken v2.2), which also
/// serves ERC-1271 payers.
interface IERC3009Receive {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external;
}
