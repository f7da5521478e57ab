"""A test wallet injected into the page as ``window.ethereum`` (EIP-1193), whose keys stay in Python.

The page's script sees an ordinary injected provider. Account and chain answers come from the shim itself; every
signature request goes through the CDP binding ``__walletSign`` to :class:`TestWallet`, which signs with
eth_account (the key never enters the page) and records exactly what the page asked it to sign. The wallet
starts on Ethereum mainnet (0x1), so the page must ask it to switch chains.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.signers.local import LocalAccount

from tests.paywall.cdp import Page

SHIM = """
(() => {
  const address = %(address)s;
  let chainId = "0x1";
  let next = 0;
  const pending = new Map();
  window.__walletCalls = [];
  window.__cspViolations = [];
  document.addEventListener("securitypolicyviolation", (e) => {
    window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
  });
  window.__walletSettle = (id, ok, value) => {
    const p = pending.get(id);
    pending.delete(id);
    if (ok) p.resolve(value); else p.reject(Object.assign(new Error(value), { code: 4001 }));
  };
  const askPython = (method, params) => new Promise((resolve, reject) => {
    const id = ++next;
    pending.set(id, { resolve, reject });
    window.__walletSign(JSON.stringify({ id, method, params }));
  });
  window.ethereum = {
    isTestWallet: true,
    async request({ method, params }) {
      window.__walletCalls.push(method);
      switch (method) {
        case "eth_requestAccounts":
        case "eth_accounts":
          return [address];
        case "eth_chainId":
          return chainId;
        case "wallet_switchEthereumChain":
          chainId = params[0].chainId;
          return null;
        case "eth_signTypedData_v4":
        case "personal_sign":
          return askPython(method, params);
        default:
          throw Object.assign(new Error("unsupported method " + method), { code: 4200 });
      }
    },
  };
})();
"""


class TestWallet:
    __test__ = False  # not a pytest class

    def __init__(self, account: LocalAccount) -> None:
        self.account = account
        self.requests: list[tuple[str, Any]] = []  # (method, what the page asked to sign)
        self._tasks: set[asyncio.Task[None]] = set()
        self._page: Page | None = None

    async def install(self, page: Page) -> None:
        """Before navigating: the binding and the provider exist before any page script runs."""
        self._page = page
        page.on("Runtime.bindingCalled", self._called)
        await page.send("Runtime.addBinding", name="__walletSign")
        source = SHIM % {"address": json.dumps(self.account.address)}
        await page.send("Page.addScriptToEvaluateOnNewDocument", source=source)

    def _called(self, params: dict[str, Any]) -> None:
        if params.get("name") != "__walletSign":
            return
        task = asyncio.create_task(self._sign(json.loads(params["payload"]), params["executionContextId"]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sign(self, request: dict[str, Any], context: int) -> None:
        method, params = request["method"], request["params"]
        try:
            if method == "eth_signTypedData_v4":
                signer, raw = params
                typed = json.loads(raw)
                self.requests.append((method, typed))
                assert signer.lower() == self.account.address.lower()
                signed = self.account.sign_message(encode_typed_data(full_message=typed))
            else:  # personal_sign: [hex message, address]
                message, signer = params
                self.requests.append((method, bytes.fromhex(message[2:]).decode()))
                assert signer.lower() == self.account.address.lower()
                signed = self.account.sign_message(encode_defunct(hexstr=message))
            answer = (True, "0x" + bytes(signed.signature).hex())
        except Exception as exc:  # the page sees a rejected request, the test sees the failure in requests
            answer = (False, f"{type(exc).__name__}: {exc}")
        assert self._page is not None
        ok, value = answer
        await self._page.send(
            "Runtime.evaluate",
            expression=f"window.__walletSettle({request['id']}, {json.dumps(ok)}, {json.dumps(value)})",
            contextId=context,
        )
