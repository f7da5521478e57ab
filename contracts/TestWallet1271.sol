// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

/// @title TestWallet1271 - the smallest ERC-1271 smart wallet, for testing contract-wallet payers.
/// @notice A signature is valid when it is the owner's 65-byte ECDSA signature over the hash as given (no extra
/// wrapping), so an EIP-3009 authorization "from" this wallet is signed by the owner over the token's EIP-712 digest.
contract TestWallet1271 {
    bytes4 private constant _MAGIC = 0x1626ba7e; // bytes4(keccak256("isValidSignature(bytes32,bytes)"))
    bytes4 private constant _INVALID = 0xffffffff;
    uint256 private constant _HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    address public immutable owner;

    constructor(address owner_) {
        owner = owner_;
    }

    /// @dev Never reverts: ERC-1271 callers treat anything but the magic value as "invalid".
    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        if (signature.length != 65) return _INVALID;
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > _HALF_N || (v != 27 && v != 28)) return _INVALID;
        address signer = ecrecover(hash, v, r, s);
        return signer != address(0) && signer == owner ? _MAGIC : _INVALID;
    }

    /// @notice Lets the owner move the wallet's funds (e.g. token transfers) in tests.
    function execute(address target, uint256 value, bytes calldata data) external returns (bytes memory) {
        require(msg.sender == owner, "TestWallet1271: not the owner");
        (bool ok, bytes memory result) = target.call{value: value}(data);
        if (!ok) {
            assembly ("memory-safe") {
                revert(add(result, 0x20), mload(result))
            }
        }
        return result;
    }

    receive() external payable {}
}
