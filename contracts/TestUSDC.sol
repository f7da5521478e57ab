// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.20;

/// @title TestUSDC - a USDC-like EIP-3009 token for local chains only.
/// @notice Behaves like Circle's FiatToken v2.2 where the gateway can observe it (EIP-712 domain, both overloads
/// of transferWithAuthorization and receiveWithAuthorization, ERC-1271 payers, revert reasons, events), without
/// the admin machinery.
/// `mint` is open to anyone: never deploy this anywhere that holds value.
/// @dev Everything the EIP-712 domain needs lives in code (immutables) or is read at call time
/// (block.chainid, address(this)), so the runtime code can be copied with `anvil_setCode` onto the canonical USDC
/// address of the chain being impersonated and still produce the right domain separator with empty storage.
contract TestUSDC {
    // ------------------------------------------------------------------------------------------------ constants
    string public constant symbol = "USDC";
    uint8 public constant decimals = 6;

    bytes32 private constant _EIP712_DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 public constant TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    bytes32 public constant RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );
    bytes32 public constant CANCEL_AUTHORIZATION_TYPEHASH =
        keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");

    bytes4 private constant _ERC1271_MAGIC = 0x1626ba7e; // bytes4(keccak256("isValidSignature(bytes32,bytes)"))
    // secp256k1n / 2: signatures with a larger s are malleable twins and are rejected (EIP-2).
    uint256 private constant _HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    // ------------------------------------------------------------------------------------------------ immutables
    // Short strings packed into one word each: bytes left-aligned, length in the lowest byte (cf. OpenZeppelin's
    // ShortStrings). Immutables are part of the runtime code, unlike a `string` state variable.
    bytes32 private immutable _packedName;
    bytes32 private immutable _packedVersion;
    bytes32 private immutable _hashedName;
    bytes32 private immutable _hashedVersion;

    // ------------------------------------------------------------------------------------------------ storage
    uint256 public totalSupply;
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;
    mapping(address => mapping(bytes32 => bool)) private _authorizationStates;

    // ------------------------------------------------------------------------------------------------ events
    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    event AuthorizationCanceled(address indexed authorizer, bytes32 indexed nonce);

    constructor(string memory name_, string memory version_) {
        _packedName = _pack(name_);
        _packedVersion = _pack(version_);
        _hashedName = keccak256(bytes(name_));
        _hashedVersion = keccak256(bytes(version_));
    }

    // ------------------------------------------------------------------------------------------------ metadata
    function name() external view returns (string memory) {
        return _unpack(_packedName);
    }

    function version() external view returns (string memory) {
        return _unpack(_packedVersion);
    }

    /// @notice Computed on every call so that a chain-id change or a code copy to another address stays correct.
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(
            abi.encode(_EIP712_DOMAIN_TYPEHASH, _hashedName, _hashedVersion, block.chainid, address(this))
        );
    }

    // ------------------------------------------------------------------------------------------------ ERC-20
    function transfer(address to, uint256 value) external returns (bool) {
        _transfer(msg.sender, to, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        require(value <= allowed, "ERC20: transfer amount exceeds allowance");
        unchecked {
            allowance[from][msg.sender] = allowed - value;
        }
        _transfer(from, to, value);
        return true;
    }

    function approve(address spender, uint256 value) external returns (bool) {
        require(spender != address(0), "ERC20: approve to the zero address");
        allowance[msg.sender][spender] = value;
        emit Approval(msg.sender, spender, value);
        return true;
    }

    /// @notice Open mint: test token for local chains.
    function mint(address to, uint256 value) external returns (bool) {
        require(to != address(0), "FiatToken: mint to the zero address");
        totalSupply += value;
        unchecked {
            balanceOf[to] += value; // cannot overflow: bounded by totalSupply
        }
        emit Transfer(address(0), to, value);
        return true;
    }

    // ------------------------------------------------------------------------------------------------ EIP-3009
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool) {
        return _authorizationStates[authorizer][nonce];
    }

    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        _transferWithAuthorization(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v)
        );
    }

    /// @notice The `bytes signature` overload (FiatToken v2.2) that smart-contract wallets (ERC-1271) need.
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external {
        _transferWithAuthorization(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature
        );
    }

    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        _transferWithAuthorization(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v)
        );
    }

    /// @notice The `bytes signature` overload (FiatToken v2.2): what a contract pulling a payer's funds calls, e.g.
    /// the batch-settlement deposit collector. The payee rule stops anyone who saw the authorization from
    /// front-running the payee's call with it.
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        _transferWithAuthorization(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature
        );
    }

    function cancelAuthorization(address authorizer, bytes32 nonce, uint8 v, bytes32 r, bytes32 s) external {
        _requireUnusedAuthorization(authorizer, nonce);
        _requireValidSignature(
            authorizer, keccak256(abi.encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce)), abi.encodePacked(r, s, v)
        );
        _authorizationStates[authorizer][nonce] = true;
        emit AuthorizationCanceled(authorizer, nonce);
    }

    // ------------------------------------------------------------------------------------------------ internals
    function _transferWithAuthorization(
        bytes32 typeHash,
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) private {
        // Circle's exact window: strictly after validAfter, strictly before validBefore.
        require(block.timestamp > validAfter, "FiatTokenV2: authorization is not yet valid");
        require(block.timestamp < validBefore, "FiatTokenV2: authorization is expired");
        _requireUnusedAuthorization(from, nonce);
        _requireValidSignature(
            from, keccak256(abi.encode(typeHash, from, to, value, validAfter, validBefore, nonce)), signature
        );
        _authorizationStates[from][nonce] = true;
        emit AuthorizationUsed(from, nonce);
        _transfer(from, to, value);
    }

    function _requireUnusedAuthorization(address authorizer, bytes32 nonce) private view {
        require(!_authorizationStates[authorizer][nonce], "FiatTokenV2: authorization is used or canceled");
    }

    function _requireValidSignature(address signer, bytes32 structHash, bytes memory signature) private view {
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash));
        bool ok;
        if (signer.code.length == 0) {
            ok = _recover(digest, signature) == signer;
        } else {
            // Contract wallet: ask it (ERC-1271), the way Circle's SignatureChecker does.
            (bool success, bytes memory result) =
                signer.staticcall(abi.encodeWithSelector(_ERC1271_MAGIC, digest, signature));
            ok = success && result.length >= 32 && abi.decode(result, (bytes32)) == bytes32(_ERC1271_MAGIC);
        }
        require(ok, "FiatTokenV2: invalid signature");
    }

    /// @dev Circle's ECRecover.recover: 65-byte r||s||v, low s, v in {27, 28}, non-zero result.
    function _recover(bytes32 digest, bytes memory signature) private pure returns (address signer) {
        require(signature.length == 65, "ECRecover: invalid signature length");
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly ("memory-safe") {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        require(uint256(s) <= _HALF_N, "ECRecover: invalid signature 's' value");
        require(v == 27 || v == 28, "ECRecover: invalid signature 'v' value");
        signer = ecrecover(digest, v, r, s);
        require(signer != address(0), "ECRecover: invalid signature");
    }

    function _transfer(address from, address to, uint256 value) private {
        require(from != address(0), "ERC20: transfer from the zero address");
        require(to != address(0), "ERC20: transfer to the zero address");
        uint256 balance = balanceOf[from];
        require(value <= balance, "ERC20: transfer amount exceeds balance");
        unchecked {
            balanceOf[from] = balance - value;
            balanceOf[to] += value; // cannot overflow: bounded by totalSupply
        }
        emit Transfer(from, to, value);
    }

    function _pack(string memory str) private pure returns (bytes32 packed) {
        bytes memory b = bytes(str);
        require(b.length <= 31, "TestUSDC: string longer than 31 bytes");
        assembly ("memory-safe") {
            // mload reads the first 32 bytes after the length word; bytes past the string's end are masked off.
            packed := mload(add(b, 0x20))
        }
        uint256 len = b.length;
        uint256 keep = len == 0 ? 0 : ~uint256(0) << (256 - 8 * len);
        packed = bytes32((uint256(packed) & keep) | len);
    }

    function _unpack(bytes32 packed) private pure returns (string memory str) {
        uint256 len = uint256(packed) & 0xff;
        bytes32 body = bytes32(uint256(packed) & ~uint256(0xff));
        str = new string(32); // one zeroed word of data; shorten the length afterwards
        assembly ("memory-safe") {
            mstore(add(str, 0x20), body)
            mstore(str, len)
        }
    }
}
