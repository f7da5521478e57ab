// Pays one JSON POST with the official x402 TypeScript client (@x402/fetch wrapping fetch, @x402/evm's exact
// scheme signing with a viem account) and prints {status, headers, body (base64 of the bytes)} as JSON.
// usage: node pay_raw_with_x402_fetch.mjs <node_modules dir> <url> <private key> <x-cell> <json body>
import { createRequire } from "node:module";
import { join } from "node:path";

const [modules, url, key, cell, body] = process.argv.slice(2);
const require = createRequire(join(modules, "resolve-from-here.js"));
const { x402Client, wrapFetchWithPayment } = require("@x402/fetch");
const { registerExactEvmScheme } = require("@x402/evm/exact/client");
const { privateKeyToAccount } = require("viem/accounts");

const client = new x402Client();
registerExactEvmScheme(client, { signer: privateKeyToAccount(key) });
const paying = wrapFetchWithPayment(fetch, client);
const res = await paying(url, { method: "POST", headers: { "content-type": "application/json", "x-cell": cell }, body });
const headers = Object.fromEntries(res.headers.entries());
const bytes = Buffer.from(await res.arrayBuffer());
console.log(JSON.stringify({ status: res.status, headers, body: bytes.toString("base64") }));
