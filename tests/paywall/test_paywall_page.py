"""The HTML 402 as bytes: same status and x402 headers, a self-contained page, a CSP that allows exactly its two
inline blocks, and nothing from the config or the request inserted unescaped."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import httpx

from gateway.dev.chain import DevChain
from gateway.x402.codec import decode_header
from tests.paywall.conftest import HOSTILE, ROUTES
from tests.support.gateway import running_gateway, sqlite_url
from tests.support.servers import raw_http

HTML = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def inline_blocks(page: str, tag: str) -> list[str]:
    return re.findall(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", page, flags=re.S)


def parse_csp(header: str) -> dict[str, str]:
    directives = (part.strip().split(" ", 1) for part in header.split(";") if part.strip())
    return {d[0]: d[1] if len(d) > 1 else "" for d in directives}


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_browser_gets_a_page_and_keeps_the_challenge(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw, gw.client() as http:
        page = http.get("/report", headers=HTML)
        program = http.get("/report", headers={"accept": "application/json"})
    assert page.status_code == program.status_code == 402
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert program.headers["content-type"] == "application/json"
    # An agent that happens to send Accept: text/html still finds everything it needs in the headers.
    for name in ("payment-required", "cache-control", "access-control-expose-headers"):
        assert page.headers[name] == program.headers[name]
    assert decode_header(page.headers["payment-required"])["accepts"][0]["amount"] == "10000"
    assert "content-security-policy" not in program.headers

    html = page.text
    assert ">$0.01<" in html and "eip155:8453" in html and gw.pay_to in html and base_chain.usdc in html
    # Self-contained: no external script, style, font, image or frame; the only links are inert anchors.
    assert not re.search(r"<(?:img|iframe|object|embed|link rel=\"stylesheet\")", html)
    assert "@import" not in html and "url(" not in html
    assert re.findall(r'\b(?:src|href)="([^"]*)"', html) == ["data:,", "https://x402.org"]
    assert len(re.findall(r"<script\b", html)) == 2  # the JSON data block and the page's own script

    # The CSP allows exactly the page's own inline script and style (by hash) and fetches to its own origin.
    policy = parse_csp(page.headers["content-security-policy"])
    script = inline_blocks(html, "script")[-1]
    (style,) = inline_blocks(html, "style")
    assert policy["script-src"] == csp_hash(script)
    assert policy["style-src"] == csp_hash(style)
    assert policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"


def test_description_with_script_is_escaped(base_chain: DevChain, tmp_path: Path) -> None:
    """docs/threat-model.md T23: stored XSS through the config. The description shows as text and cannot close the data
    block."""
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw, gw.client() as http:
        html = http.get("/hostile", headers=HTML).text
    assert "<script>window.__xss" not in html and "<img src=x" not in html
    assert "&lt;/script&gt;&lt;script&gt;window.__xss = 1&lt;/script&gt;&lt;img src=x onerror=&quot;" in html
    assert len(re.findall(r"<script\b", html)) == 2
    data = inline_blocks(html, "script")[0]
    assert "<" not in data and ">" not in data
    assert json.loads(data)["paymentRequired"]["resource"]["description"] == HOSTILE


def test_request_controlled_values_are_escaped(base_chain: DevChain, tmp_path: Path) -> None:
    """docs/threat-model.md T23: reflected XSS. The resource URL on the page comes from the request (path, query,
    Host)."""
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        request = (
            b"GET /report?q=<script>alert(1)</script>&x=\"'><b> HTTP/1.1\r\n"
            b'Host: evil.example"><script>alert(2)</script>\r\n'
            b"Accept: text/html\r\nConnection: close\r\n\r\n"
        )
        status, headers, body = raw_http(gw.url, request)
    html = body.decode()
    assert status == 402 and headers["content-type"].startswith("text/html")
    assert "<script>alert" not in html and "<b>" not in html
    assert "q=&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "evil.example&quot;&gt;&lt;script&gt;alert(2)" in html
    assert len(re.findall(r"<script\b", html)) == 2


def test_post_route_page_offers_the_example_body(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw, gw.client() as http:
        html = http.post("/agent/prompt", headers=HTML).text
        get_page = http.get("/report", headers=HTML).text
    assert '<textarea id="body"' in html
    assert "&quot;prompt&quot;: &quot;hello from the paywall&quot;" in html
    assert '<textarea id="body"' not in get_page  # GET/HEAD/DELETE send no body


def test_paywall_can_be_turned_off(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, paywall={"enabled": False}) as gw:
        r = httpx.get(gw.url + "/report", headers=HTML)
    assert r.status_code == 402
    assert r.headers["content-type"] == "application/json"
    assert r.json()["x402Version"] == 1
