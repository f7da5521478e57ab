"""The paywall in a real browser (Debian's headless Chromium over CDP): it shows the right price and networks,
and a person with an injected wallet pays with one click against the anvil chain (docs/protocol.md §2)."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.dev.chain import DevChain
from gateway.x402.txhash import binding_message
from tests.paywall.cdp import Chromium, Page
from tests.paywall.conftest import HOSTILE, OUTPUT, ROUTES
from tests.paywall.wallet import TestWallet
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url
from tests.txhash.helpers import erc20_transfer, new_tx_payer

STATE = "document.getElementById('status').dataset.state"
FINISHED = f"['paid', 'failed'].includes({STATE}) && {STATE}"


def text(page: Page, element_id: str) -> str:
    return f"document.getElementById({json.dumps(element_id)}).textContent"


async def pay_and_wait(page: Page) -> str:
    await page.evaluate("document.getElementById('pay').click()")
    state: str = await page.wait_for(FINISHED, timeout=30)
    return state


def only_own_origin(page: Page, gw: GatewayUnderTest) -> list[str]:
    """The page's requests that did not go to the gateway (data: URLs are inline, not requests)."""
    return [u for u in page.requests if not (u.startswith(gw.url + "/") or u.startswith("data:"))]


async def test_page_shows_price_and_networks_and_a_wallet_pays_it(
    base_chain: DevChain, tmp_path: Path, browser: Chromium
) -> None:
    payer = base_chain.new_payer(1_000_000)
    wallet = TestWallet(payer)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        page = await browser.page()
        await wallet.install(page)
        await page.goto(gw.url + "/report")

        assert await page.evaluate(text(page, "price")) == "$0.01"
        assert await page.evaluate(text(page, "title")) == "Today's weather report for Lisbon"
        networks = await page.evaluate(text(page, "networks"))
        assert "Base" in networks and "eip155:8453" in networks and "chain id 8453" in networks
        assert await page.evaluate("document.querySelector('#networks .pay-to').textContent") == gw.pay_to
        assert await page.evaluate("document.querySelector('#networks .asset').textContent") == base_chain.usdc
        assert await page.evaluate("document.getElementById('manual-section') !== null")  # tx-hash option shown
        await page.screenshot(OUTPUT / "paywall.png")

        before = (gw.balance(payer.address), gw.balance(gw.pay_to))
        assert await pay_and_wait(page) == "paid", await page.evaluate(text(page, "status"))

        # One upstream call, exactly the price moved, and the page shows the settlement's hash.
        assert [r.path for r in gw.upstream.requests] == ["/report"]
        assert (gw.balance(payer.address), gw.balance(gw.pay_to)) == (before[0] - 10_000, before[1] + 10_000)
        tx_hash = await page.evaluate(text(page, "tx-hash-text"))
        mined = base_chain.rpc("eth_getTransactionReceipt", [tx_hash])
        assert int(mined["status"], 16) == 1
        await page.screenshot(OUTPUT / "paywall-paid.png")

        # What the page asked the wallet to do: switch from mainnet to Base, then sign EIP-3009 typed data
        # over the requirement's domain, to the gateway's recipient, for exactly the price.
        calls = await page.evaluate("window.__walletCalls")
        assert calls == ["eth_requestAccounts", "eth_chainId", "wallet_switchEthereumChain", "eth_signTypedData_v4"]
        [(method, typed)] = wallet.requests
        assert method == "eth_signTypedData_v4"
        assert typed["primaryType"] == "TransferWithAuthorization"
        assert typed["domain"] == {
            "name": "USD Coin",
            "version": "2",
            "chainId": 8453,
            "verifyingContract": base_chain.usdc,
        }
        msg = typed["message"]
        assert (msg["from"], msg["to"], msg["value"]) == (payer.address, gw.pay_to, "10000")
        assert int(msg["validBefore"]) - int(msg["validAfter"]) == 600 + 300
        assert len(bytes.fromhex(msg["nonce"][2:])) == 32

        # Self-contained: nothing but the page itself and its paid retry; no CSP violation on the way.
        assert only_own_origin(page, gw) == []
        assert page.requests.count(gw.url + "/report") == 2
        assert await page.evaluate("window.__cspViolations") == []


async def test_post_route_page_sends_the_body_field_with_the_payment(
    base_chain: DevChain, tmp_path: Path, browser: Chromium
) -> None:
    """A browser only sees a POST route's paywall after submitting a form to it; the page cannot know that body,
    so it offers the route's input_example in an editable field and sends that, as JSON, with the payment."""
    payer = base_chain.new_payer(1_000_000)
    wallet = TestWallet(payer)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        page = await browser.page()
        await wallet.install(page)
        submit = f"""(() => {{
            const form = document.createElement('form');
            form.method = 'post';
            form.action = {json.dumps(gw.url + "/agent/prompt")};
            document.body.append(form);
            form.submit();
        }})()"""
        await page.loading(page.evaluate(submit))
        assert await page.evaluate(text(page, "method")) == "POST"
        assert await page.evaluate(text(page, "price")) == "$0.10"
        body = await page.evaluate("document.getElementById('body').value")
        assert json.loads(body) == {"prompt": "hello from the paywall"}
        await page.evaluate("document.getElementById('body').value = JSON.stringify({prompt: 'edited'})")
        assert gw.upstream.requests == []  # the form post itself got the 402 and never reached the upstream

        assert await pay_and_wait(page) == "paid", await page.evaluate(text(page, "status"))
        (request,) = gw.upstream.requests
        assert (request.method, request.path) == ("POST", "/agent/prompt")
        assert request.header("content-type") == "application/json"
        assert json.loads(request.body) == {"prompt": "edited"}
        shown = json.loads(await page.evaluate(text(page, "response")))  # the upstream's echo, shown as text
        assert shown["method"] == "POST"


async def test_description_with_script_renders_as_text(base_chain: DevChain, tmp_path: Path, browser: Chromium) -> None:
    """docs/threat-model.md T23: reflected/stored XSS. A description full of markup is shown verbatim and runs
    nothing."""
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        page = await browser.page()
        watch = "window.__cspViolations = []; document.addEventListener('securitypolicyviolation', e => {"
        watch += "window.__cspViolations.push(e.violatedDirective); });"
        await page.send("Page.addScriptToEvaluateOnNewDocument", source=watch)
        await page.goto(gw.url + "/hostile?q=%3Cscript%3Ewindow.__xss=3%3C/script%3E")
        assert await page.evaluate("typeof window.__xss") == "undefined"
        assert await page.evaluate(text(page, "title")) == HOSTILE
        assert await page.evaluate("document.scripts.length") == 2  # the JSON data block and the page's own
        assert await page.evaluate("document.images.length") == 0
        assert await page.evaluate("window.__cspViolations") == []  # escaped, so there was nothing to block
        data = json.loads(await page.evaluate(text(page, "x402-data")))
        assert data["paymentRequired"]["resource"]["description"] == HOSTILE


async def test_manual_transfer_is_proven_with_the_senders_signature(
    base_chain: DevChain, tmp_path: Path, browser: Chromium
) -> None:
    """The manual option: the person sends USDC themselves, pastes the hash, and their wallet signs the binding
    (tx-hash proofs: a hash alone is public and proves nothing about who is asking)."""
    payer = new_tx_payer(base_chain)
    wallet = TestWallet(payer)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        page = await browser.page()
        await wallet.install(page)
        await page.goto(gw.url + "/report")
        tx_hash = erc20_transfer(base_chain, payer, gw.pay_to, 10_000)
        await page.evaluate(f"document.getElementById('txhash').value = {json.dumps(tx_hash.upper()[2:])}")
        await page.evaluate("document.getElementById('prove').click()")
        assert await page.wait_for(FINISHED) == "failed"  # not 0x-prefixed: refused in the page, nothing sent
        assert gw.upstream.requests == [] and wallet.requests == []

        await page.evaluate(f"document.getElementById('txhash').value = {json.dumps(tx_hash)}")
        await page.evaluate("document.getElementById('prove').click()")
        assert await page.wait_for(f"{STATE} !== 'failed' && {FINISHED}") == "paid"
        assert [r.path for r in gw.upstream.requests] == ["/report"]
        assert wallet.requests == [
            ("personal_sign", binding_message(tx_hash, "base", "GET", gw.url + "/report")),
        ]
        assert await page.evaluate(text(page, "tx-hash-text")) == tx_hash
