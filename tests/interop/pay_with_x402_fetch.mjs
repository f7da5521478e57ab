// Pays one request with the official x402 TypeScript client, as a buyer's app would: @x402/fetch wrapping fetch,
// @x402/evm's exact scheme (v2 and v1) signing with a viem account. Prints {status, headers, body} as JSON.
// usage: node pay_with_x402_fetch.mjs <node_modules dir> <url> <private key> [method] [json body]
import { createRequire } from "node:module";
import { join } from "node:path";

const [modules, url, key, method = "POST", body = '{"prompt":"hello"}'] = process.argv.slice(2);
const require = createRequire(join(modules, "resolve-from-here.js"));
const { x402Client, wrapFetchWithPayment } = require("@x402/fetch");
const { registerExactEvmScheme } = require("@x402/evm/exact/client");
const { privateKeyToAccount } = require("viem/accounts");

const client = new x402Client();
registerExactEvmScheme(client, { signer: privateKeyToAccount(key) });
const paying = wrapFetchWithPayment(fetch, client);
const init = { method, headers: { "content-type": "application/json" } };
if (method !== "GET" && method !== "HEAD") init.body = body;
const res = await paying(url, init);
const headers = Object.fromEntries(res.headers.entries());
console.log(JSON.stringify({ status: res.status, headers, body: await res.text() }));
