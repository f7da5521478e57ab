// Compiles contracts/*.sol with solcjs (installed by scripts/install-tools.sh into .tools/) and writes the
// committed artifacts in contracts_abi/. The output is byte-for-byte reproducible: fixed compiler version and
// settings, no source hash in the bytecode (bytecodeHash "none", so comment edits do not churn the artifacts),
// recursively sorted object keys, and a trailing newline.
//
//   node contracts/build.mjs            rebuild the artifacts
//   node contracts/build.mjs --check    exit 1 if the committed artifacts differ from a fresh build

import { readFileSync, writeFileSync, existsSync, readdirSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const TOOLS = join(ROOT, ".tools");
const OUT = join(ROOT, "contracts_abi");
const SOLC_VERSION = "0.8.28";
// Contracts with an artifact; every contracts/*.sol is compiled (the interfaces they import live there too).
const CONTRACTS = ["TestUSDC", "TestWallet1271", "Multicall3", "X402BatchSettlement", "ERC3009DepositCollector"];
// evmVersion "cancun": the newest fork solc 0.8.28 and every anvil since 2024 agree on (anvil defaults newer).
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun",
  metadata: { bytecodeHash: "none" },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

// The ABI subsets the gateway loads at run time, taken from the compiled TestUSDC so they cannot drift from it.
const EIP3009_SUBSET = [
  ["function", "balanceOf"],
  ["function", "authorizationState"],
  ["function", "transferWithAuthorization"], // both overloads
  ["function", "name"],
  ["function", "version"],
  ["function", "DOMAIN_SEPARATOR"],
  ["event", "Transfer"],
  ["event", "AuthorizationUsed"],
];

// What the gateway calls on the batch-settlement contract at run time (claims, settlement, refunds, the channel
// reads), every event (WithdrawInitiated tells it to claim before a withdrawal lands) and every error, taken from
// the compiled X402BatchSettlement so the subset cannot drift from it.
const BATCH_SETTLEMENT_SUBSET = [
  ["function", "deposit"],
  ["function", "claim"],
  ["function", "claimWithSignature"],
  ["function", "settle"],
  ["function", "refund"],
  ["function", "refundWithSignature"],
  ["function", "multicall"],
  ["function", "getChannelId"],
  ["function", "getVoucherDigest"],
  ["function", "getRefundDigest"],
  ["function", "getClaimBatchDigest"],
  ["function", "channels"],
  ["function", "pendingWithdrawals"],
  ["function", "refundNonce"],
  ["function", "receivers"],
  ["function", "eip712Domain"],
];

function loadSolc() {
  const require = createRequire(join(TOOLS, "package.json"));
  let solc;
  try {
    solc = require("solc");
  } catch {
    console.error(`solc not found in ${TOOLS}/node_modules: run scripts/install-tools.sh`);
    process.exit(2);
  }
  if (!solc.version().startsWith(SOLC_VERSION + "+")) {
    console.error(`expected solc ${SOLC_VERSION}, found ${solc.version()}: run scripts/install-tools.sh`);
    process.exit(2);
  }
  return solc;
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.keys(value)
        .sort()
        .map((k) => [k, sortKeys(value[k])]),
    );
  }
  return value;
}

const dump = (obj) => JSON.stringify(sortKeys(obj), null, 2) + "\n";

function main() {
  const check = process.argv.includes("--check");
  const solc = loadSolc();
  const sources = {};
  for (const file of readdirSync(join(ROOT, "contracts")).filter((f) => f.endsWith(".sol")).sort()) {
    const path = `contracts/${file}`;
    sources[path] = { content: readFileSync(join(ROOT, path), "utf8") };
  }
  const input = { language: "Solidity", sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  for (const e of output.errors || []) console.error(e.formattedMessage);
  if (errors.length) process.exit(1);

  const compiler = {
    name: "solc",
    version: solc.version(),
    settings: { evmVersion: SETTINGS.evmVersion, optimizer: SETTINGS.optimizer, metadata: SETTINGS.metadata },
  };
  const files = {};
  const abis = {};
  for (const name of CONTRACTS) {
    const c = output.contracts[`contracts/${name}.sol`][name];
    abis[name] = c.abi;
    files[`${name}.json`] = dump({
      contractName: name,
      abi: c.abi,
      bytecode: "0x" + c.evm.bytecode.object,
      // Immutables are zero placeholders here; the live runtime code comes from eth_getCode after a deploy.
      deployedBytecode: "0x" + c.evm.deployedBytecode.object,
      compiler,
    });
  }
  const pick = (abi, wanted) =>
    wanted.flatMap(([type, name]) => {
      const found = abi.filter((e) => e.type === type && e.name === name);
      if (!found.length) throw new Error(`${type} ${name} missing from the ABI`);
      return found;
    });
  files["eip3009.json"] = dump({
    contractName: "EIP3009",
    description: "EIP-3009 / USDC subset the gateway calls; generated from TestUSDC by contracts/build.mjs",
    abi: pick(abis.TestUSDC, EIP3009_SUBSET),
  });
  files["multicall3.json"] = dump({
    contractName: "Multicall3",
    description: "Multicall3 aggregate3 (batched settlements); generated from contracts/Multicall3.sol by contracts/build.mjs",
    abi: pick(abis.Multicall3, [["function", "aggregate3"]]),
  });
  files["erc1271.json"] = dump({
    contractName: "ERC1271",
    description: "ERC-1271 isValidSignature; generated from TestWallet1271 by contracts/build.mjs",
    abi: pick(abis.TestWallet1271, [["function", "isValidSignature"]]),
  });

  const settlementAbi = abis.X402BatchSettlement;
  const everyOf = (abi, type) => abi.filter((e) => e.type === type).map((e) => [type, e.name]);
  files["batch_settlement.json"] = dump({
    contractName: "X402BatchSettlement",
    description:
      "x402 batch-settlement channel contract subset the gateway calls, with every event and error; generated from contracts/X402BatchSettlement.sol by contracts/build.mjs",
    abi: pick(settlementAbi, [
      ...BATCH_SETTLEMENT_SUBSET,
      ...everyOf(settlementAbi, "event"),
      ...everyOf(settlementAbi, "error"),
    ]),
  });
  files["deposit_collector.json"] = dump({
    contractName: "ERC3009DepositCollector",
    description:
      "ERC-3009 deposit collector (collect, its settlement address, its errors); generated from contracts/ERC3009DepositCollector.sol by contracts/build.mjs",
    abi: abis.ERC3009DepositCollector.filter((e) => e.type !== "constructor"),
  });

  let stale = 0;
  for (const [file, text] of Object.entries(files)) {
    const path = join(OUT, file);
    const same = existsSync(path) && readFileSync(path, "utf8") === text;
    if (check) {
      if (!same) {
        console.error(`stale: contracts_abi/${file}`);
        stale++;
      }
    } else if (!same) {
      writeFileSync(path, text);
      console.log(`wrote contracts_abi/${file}`);
    }
  }
  if (check && stale) process.exit(1);
}

main();
