"""The browser paywall: a person opening a priced URL (``Accept: text/html``) gets a page they can pay from.

The status stays 402 and every x402 header stays (an agent that sends ``Accept: text/html`` still finds the
challenge); only the body changes (PaymentMiddleware's ``paywall`` hook). The page is self-contained: one inline
stylesheet and one inline script (``gateway/http/paywall_assets/``), no CDN, no fonts, no images, no request except
the paid retry to its own URL. It shows the route's description, the price in dollars, the networks and, for a
manual transfer, the recipient and the USDC contract on each; its "Pay $… with wallet" button signs the EIP-3009
authorization with an injected EIP-1193 wallet (``window.ethereum``) and re-issues the request with
``PAYMENT-SIGNATURE``; a transaction hash can be proven the same way (tx-hash proofs, EIP-191 binding).

The page cannot know a POST's original body (a 402 does not echo it): for POST/PUT/PATCH routes it shows an
editable body field, prefilled with the route's ``input_example``, and sends that with the paid retry.

Everything inserted into the HTML is escaped (descriptions come from the config, the resource URL from the
request: docs/threat-model.md T23, reflected XSS); the data the script needs travels in a JSON block with ``<``, ``>``
and ``&`` escaped, so no value can close it. The Content-Security-Policy allows exactly the two inline blocks by their
SHA-256 hashes (static files, so static hashes: no per-response nonce to thread through), ``connect-src 'self'``
and nothing else. The payment middleware sends it as a header (:attr:`Paywall.headers`); the page repeats it in a
``<meta>`` as well, so it holds wherever the page ends up.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from importlib import resources
from typing import Any

from gateway.bazaar import BODY_METHODS, CONTENT_TYPES
from gateway.config import GatewayConfig
from gateway.http.asgi import Scope
from gateway.money import format_usd
from gateway.schemes.base import PricedRoute
from gateway.x402.challenge import Challenge
from gateway.x402.txhash import BINDING_HEADER, NETWORK_HEADER

DISPLAY_NAMES = {
    "base": "Base",
    "base-sepolia": "Base Sepolia",
    "polygon": "Polygon",
    "polygon-amoy": "Polygon Amoy",
}
_TOKEN = re.compile(r"\{\{([a-z_]+)\}\}")


def _asset(name: str) -> str:
    return resources.files("gateway.http").joinpath("paywall_assets", name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _json_for_html(value: Any) -> str:
    """JSON that is inert inside ``<script type="application/json">``: no ``</script>``, no ``<!--``."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


class Paywall:
    """Renders the HTML 402 (PaymentMiddleware's ``paywall``): the page and the headers it is sent with."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._template = _asset("paywall.html")
        self._css = _asset("paywall.css")
        self._js = _asset("paywall.js")
        policy = (
            f"default-src 'none'; script-src {_sha256(self._js)}; style-src {_sha256(self._css)}; "
            "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
        )
        self.meta_policy = policy
        # frame-ancestors only works as a header: no other site may frame the pay button (clickjacking).
        self.policy = policy + "; frame-ancestors 'none'"
        # What an HTML 402 leaves with, besides the x402 headers: its CSP and the usual hardening.
        self.headers: list[tuple[bytes, bytes]] = [
            (b"content-security-policy", self.policy.encode("ascii")),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
        ]

    def render(self, scope: Scope, route: PricedRoute, challenge: Challenge) -> bytes | None:
        required = challenge.document
        cfg = route.config
        method = str(scope["method"])
        price = format_usd(cfg.price)
        resource = str((required.get("resource") or {}).get("url", ""))
        reqs = route.requirements
        network_items = "".join(
            "<li>"
            f'<div class="net"><strong>{_e(DISPLAY_NAMES.get(r.network, r.network))}</strong>'
            f'<span class="caip">{_e(r.caip2)}</span><span class="chain">chain id {r.chain_id}</span></div>'
            f'<div class="kv"><span>Recipient</span><code class="pay-to">{_e(r.pay_to)}</code></div>'
            f'<div class="kv"><span>USDC contract</span><code class="asset">{_e(r.asset)}</code></div>'
            f'<div class="kv"><span>Amount</span><code>{r.amount} units (6 decimals) = ${_e(price)}</code></div>'
            "</li>"
            for r in reqs
        )
        accepts = required.get("accepts") or []
        network_options = "".join(
            f'<option value="{i}">{_e(DISPLAY_NAMES.get(r.network, r.network))} ({_e(r.caip2)})</option>'
            for i, r in enumerate(reqs)
            if i < len(accepts)
        )
        body_field = ""
        content_type = CONTENT_TYPES[cfg.docs.body_type]
        if method in BODY_METHODS:
            example = cfg.docs.input_example
            if example is None:
                prefill = ""
            elif isinstance(example, str):
                prefill = example
            else:
                prefill = json.dumps(example, indent=2, ensure_ascii=False)
            body_field = (
                f'<label for="body">Request body <span class="muted">({_e(content_type)}; sent with the paid '
                f"request: this page cannot see the body of the request that got the 402)</span></label>"
                f'<textarea id="body" rows="6" spellcheck="false">{_e(prefill)}</textarea>'
            )
        manual = ""
        if cfg.tx_hash:
            manual = (
                '<section class="card" id="manual-section"><h2>Or pay by transfer</h2>'
                f"<p>Send exactly <strong>${_e(price)}</strong> in USDC (the contract above) to the recipient on one "
                "of the networks above, from a wallet you control. Then paste the transaction hash: the sender signs "
                "a short message binding that transfer to this request (nobody else can use your hash).</p>"
                '<div class="row"><input id="txhash" type="text" inputmode="text" autocomplete="off" '
                'spellcheck="false" placeholder="0x… transaction hash" aria-label="Transaction hash">'
                '<button id="prove" type="button" class="secondary">Prove transfer with wallet</button></div>'
                "</section>"
            )
        data = {
            "paymentRequired": required,
            "method": method,
            "contentType": content_type,
            "txHeaders": {"payment": "X-PAYMENT", "network": NETWORK_HEADER, "binding": BINDING_HEADER},
        }
        values = {
            "csp": _e(self.meta_policy),
            "title": _e(cfg.description or "Payment required"),
            "description": _e(cfg.description),
            "method": _e(method),
            "resource": _e(resource),
            "price": _e(price),
            "network_items": network_items,
            "network_options": network_options,
            "body_field": body_field,
            "manual_section": manual,
            "data": _json_for_html(data),
            "css": self._css,
            "js": self._js,
        }
        page = _TOKEN.sub(lambda m: values[m.group(1)], self._template)
        return page.encode("utf-8")


__all__ = ["Paywall"]
