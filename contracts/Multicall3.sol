// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title Multicall3 (aggregate3 and tryAggregate), for the local dev chain
/// @notice The gateway settles several EIP-3009 authorizations in one transaction through `aggregate3` of the
/// Multicall3 deployed at 0xcA11bde05977b3631167028862bE2a173976CA11 on Base, Polygon and most EVM chains; the
/// official x402 facilitator batches its channel reads through `tryAggregate`. The dev chain has none, so the dev
/// kit puts this contract's runtime code at that address: the same functions, selectors, argument and return
/// encodings, and the same semantics (each call in order; a failing call reverts the whole batch unless it is
/// allowed to fail). Written for this project; the rest of Multicall3's interface is left out.
contract Multicall3 {
    struct Call {
        address target;
        bytes callData;
    }

    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData) {
        uint256 length = calls.length;
        returnData = new Result[](length);
        for (uint256 i = 0; i < length; i++) {
            Call3 calldata item = calls[i];
            (bool success, bytes memory ret) = item.target.call(item.callData);
            require(success || item.allowFailure, "Multicall3: call failed");
            returnData[i] = Result(success, ret);
        }
    }

    /// @notice Every call in order; with `requireSuccess` false a failing call is reported, not fatal.
    function tryAggregate(bool requireSuccess, Call[] calldata calls)
        external
        payable
        returns (Result[] memory returnData)
    {
        uint256 length = calls.length;
        returnData = new Result[](length);
        for (uint256 i = 0; i < length; i++) {
            (bool success, bytes memory ret) = calls[i].target.call(calls[i].callData);
            require(success || !requireSuccess, "Multicall3: call failed");
            returnData[i] = Result(success, ret);
        }
    }
}
