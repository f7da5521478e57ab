// x402 paywall: pay the 402 this page arrived with, from an injected EIP-1193 wallet (window.ethereum), and
// re-issue the request with the payment. The gateway rendered (and HTML-escaped) everything on the page; this
// script reads the JSON data block and writes only through textContent, never as HTML.
"use strict";
(() => {
  const el = (id) => document.getElementById(id);
  const data = JSON.parse(el("x402-data").textContent);
  const required = data.paymentRequired;
  const accepts = required.accepts || [];
  const txOptions = (required.extensions && required.extensions.txhash && required.extensions.txhash.options) || [];
  const BODY_METHODS = ["POST", "PUT", "PATCH"];
  const EXPLORERS = {
    8453: "https://basescan.org/tx/",
    84532: "https://sepolia.basescan.org/tx/",
    137: "https://polygonscan.com/tx/",
    80002: "https://amoy.polygonscan.com/tx/",
  };
  const TYPES = {
    EIP712Domain: [
      { name: "name", type: "string" },
      { name: "version", type: "string" },
      { name: "chainId", type: "uint256" },
      { name: "verifyingContract", type: "address" },
    ],
    TransferWithAuthorization: [
      { name: "from", type: "address" },
      { name: "to", type: "address" },
      { name: "value", type: "uint256" },
      { name: "validAfter", type: "uint256" },
      { name: "validBefore", type: "uint256" },
      { name: "nonce", type: "bytes32" },
    ],
  };

  const setStatus = (state, text) => {
    const status = el("status");
    status.dataset.state = state;
    status.textContent = text;
    el("result").hidden = false;
  };
  const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  const randomNonce = () => {
    const bytes = new Uint8Array(32);
    crypto.getRandomValues(bytes);
    return "0x" + hex(bytes);
  };
  // Standard base64 of compact UTF-8 JSON, as every x402 client encodes its header (btoa alone is Latin-1 only).
  const base64Json = (value) => {
    let binary = "";
    for (const b of new TextEncoder().encode(JSON.stringify(value))) binary += String.fromCharCode(b);
    return btoa(binary);
  };
  const fromBase64Json = (text) =>
    JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(text.trim()), (c) => c.charCodeAt(0))));
  const chainIdOf = (req) => Number(String(req.network).split(":")[1]);
  const selected = () => accepts[Number(el("network").value)] || accepts[0];

  async function connect() {
    const eth = window.ethereum;
    if (!eth || typeof eth.request !== "function") {
      throw new Error("No browser wallet found (window.ethereum). Install one, or pay by transfer.");
    }
    const accounts = await eth.request({ method: "eth_requestAccounts" });
    if (!accounts || !accounts.length) throw new Error("The wallet shared no account.");
    return { eth, from: accounts[0] };
  }

  async function useChain(eth, chainId) {
    const current = Number(await eth.request({ method: "eth_chainId" }));
    if (current !== chainId) {
      setStatus("working", "Switch your wallet to chain " + chainId + "…");
      await eth.request({ method: "wallet_switchEthereumChain", params: [{ chainId: "0x" + chainId.toString(16) }] });
    }
  }

  async function payWithWallet() {
    const req = selected();
    if (!req || req.scheme !== "exact" || !String(req.network).startsWith("eip155:")) {
      throw new Error("This route offers no EVM payment a wallet can sign.");
    }
    const { eth, from } = await connect();
    const chainId = chainIdOf(req);
    await useChain(eth, chainId);
    const now = Math.floor(Date.now() / 1000);
    const authorization = {
      from,
      to: req.payTo,
      value: String(req.amount),
      validAfter: String(now - 600),
      validBefore: String(now + Number(req.maxTimeoutSeconds)),
      nonce: randomNonce(),
    };
    const typedData = {
      types: TYPES,
      primaryType: "TransferWithAuthorization",
      domain: { name: req.extra.name, version: req.extra.version, chainId, verifyingContract: req.asset },
      message: authorization,
    };
    setStatus("working", "Sign the USDC authorization in your wallet…");
    const signature = await eth.request({ method: "eth_signTypedData_v4", params: [from, JSON.stringify(typedData)] });
    const payment = { x402Version: 2, resource: required.resource, accepted: req, payload: { signature, authorization } };
    await retry({ "PAYMENT-SIGNATURE": base64Json(payment) });
  }

  async function proveTransfer() {
    const txHash = el("txhash").value.trim().toLowerCase();
    if (!/^0x[0-9a-f]{64}$/.test(txHash)) throw new Error("A transaction hash is 0x followed by 64 hex digits.");
    const req = selected();
    const option = txOptions.find((o) => o.caip2 === req.network);
    if (!option) throw new Error("This network takes no transfer proofs.");
    const { eth, from } = await connect();
    const message = option.binding.message.replace("<tx hash>", txHash);
    setStatus("working", "Sign the message that binds the transfer to this request…");
    const signature = await eth.request({
      method: "personal_sign",
      params: ["0x" + hex(new TextEncoder().encode(message)), from],
    });
    const h = data.txHeaders;
    await retry({ [h.payment]: txHash, [h.network]: option.network, [h.binding]: signature });
  }

  async function retry(paymentHeaders) {
    // Accept without text/html: a refusal comes back as the JSON 402, whose reason is shown below.
    const init = {
      method: data.method,
      headers: { Accept: "application/json, */*;q=0.5", ...paymentHeaders },
      cache: "no-store",
      credentials: "same-origin",
    };
    if (BODY_METHODS.includes(data.method)) {
      init.body = el("body") ? el("body").value : "";
      init.headers["Content-Type"] = data.contentType;
    }
    setStatus("working", "Paying and calling the API…");
    const response = await fetch(window.location.href, init);
    const text = await response.text();
    const receiptHeader = response.headers.get("PAYMENT-RESPONSE") || response.headers.get("X-PAYMENT-RESPONSE");
    let receipt = null;
    try {
      receipt = receiptHeader ? fromBase64Json(receiptHeader) : null;
    } catch (_) {
      receipt = null;
    }
    showReceipt(receipt);
    showBody(response, text);
    if (response.ok) {
      setStatus("paid", "Paid · HTTP " + response.status + (receipt && receipt.transaction ? " · settled on chain" : ""));
      return;
    }
    let reason = "";
    try {
      const doc = JSON.parse(text);
      reason = [doc.error, doc.message].filter(Boolean).join(": ");
    } catch (_) {
      reason = response.statusText;
    }
    setStatus("failed", "Not served · HTTP " + response.status + (reason ? " · " + reason : ""));
  }

  function showReceipt(receipt) {
    const list = el("receipt");
    list.replaceChildren();
    if (!receipt) return;
    const row = (label, node) => {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.append(node);
      list.append(dt, dd);
    };
    const tx = String(receipt.transaction || "");
    const chainId = Number(String(receipt.network || "").split(":")[1]) || chainIdOf(selected());
    let txNode = document.createTextNode(tx || "(none)");
    if (/^0x[0-9a-fA-F]{64}$/.test(tx) && EXPLORERS[chainId]) {
      txNode = document.createElement("a");
      txNode.href = EXPLORERS[chainId] + tx;
      txNode.rel = "noreferrer noopener";
      txNode.target = "_blank";
      txNode.textContent = tx;
    }
    txNode.id = "tx-hash";
    const code = document.createElement("code");
    code.id = "tx-hash-text";
    code.append(txNode);
    row("Transaction", code);
    row("Network", document.createTextNode(String(receipt.network || "")));
    if (receipt.payer) row("Payer", document.createTextNode(String(receipt.payer)));
    row("Settled", document.createTextNode(receipt.success ? "yes" : "no" + (receipt.errorReason ? " (" + receipt.errorReason + ")" : "")));
  }

  function showBody(response, text) {
    let shown = text;
    if ((response.headers.get("Content-Type") || "").includes("json")) {
      try {
        shown = JSON.stringify(JSON.parse(text), null, 2);
      } catch (_) {
        shown = text;
      }
    }
    el("response").textContent = shown.length > 65536 ? shown.slice(0, 65536) + "\n…" : shown;
  }

  const guarded = (action) => async () => {
    const buttons = document.querySelectorAll("button");
    buttons.forEach((b) => (b.disabled = true));
    try {
      await action();
    } catch (error) {
      const message = (error && (error.message || error.code)) || String(error);
      setStatus("failed", error && error.code === 4001 ? "You rejected the request in your wallet." : String(message));
    } finally {
      buttons.forEach((b) => (b.disabled = false));
    }
  };

  el("pay").addEventListener("click", guarded(payWithWallet));
  if (el("prove")) el("prove").addEventListener("click", guarded(proveTransfer));
})();
