// Pays by session with the official x402 TypeScript client, as a buyer's app would: @x402/fetch wrapping fetch,
// @x402/evm's batch-settlement client scheme (one deposit, then a voucher per request) signing with a viem account.
// Pays <count> GET requests to <url>, then, if asked, a cooperative refund through the scheme's own refund API.
// Each run is a fresh client: its channel records live in memory only, so a second run with the same key is a
// client that lost its state (with an RPC URL it reads the channel from the chain, as the client's recovery needs).
// Prints one JSON line: {responses: [{status, headers, body}], wire: [{status, headers, signature}], refund, error}
// where `wire` is every paid attempt as it went over the network (corrective 402s included).
// usage: node pay_by_session_with_x402_fetch.mjs <node_modules dir> <url> <private key> <count> [rpc url|-] [refund]
import { createRequire } from "node:module";
import { join } from "node:path";

const [modules, url, key, count, rpcUrl = "-", refund = ""] = process.argv.slice(2);
const require = createRequire(join(modules, "resolve-from-here.js"));
const { x402Client, wrapFetchWithPayment } = require("@x402/fetch");
const { toClientEvmSigner } = require("@x402/evm");
const { BatchSettlementEvmScheme } = require("@x402/evm/batch-settlement/client");
const { privateKeyToAccount } = require("viem/accounts");
const { createPublicClient, http } = require("viem");

const account = privateKeyToAccount(key);
const signer = rpcUrl === "-" ? account : toClientEvmSigner(account, createPublicClient({ transport: http(rpcUrl) }));
const scheme = new BatchSettlementEvmScheme(signer);
const client = new x402Client().register("eip155:*", scheme);

const wire = [];
const headersOf = (res) => Object.fromEntries(res.headers.entries());
// The network under the client: records every paid attempt and its answer.
const recording = async (input, init) => {
  const request = new Request(input, init);
  const signature = request.headers.get("payment-signature");
  const res = await fetch(request);
  if (signature) wire.push({ status: res.status, headers: headersOf(res), signature });
  return res;
};
const paying = wrapFetchWithPayment(recording, client);

const out = { responses: [], wire, refund: null, error: null };
try {
  for (let i = 0; i < Number(count); i += 1) {
    const res = await paying(url, { method: "GET" });
    out.responses.push({ status: res.status, headers: headersOf(res), body: await res.text() });
  }
  if (refund === "refund") {
    out.refund = await scheme.refund(url, { fetch: recording });
  }
} catch (error) {
  out.error = error instanceof Error ? error.message : String(error);
}
console.log(JSON.stringify(out));
