#!/usr/bin/env bash
# Installs the local-chain toolchain into <repo>/.tools (git-ignored): the anvil binary (foundry's npm platform
# package; --ignore-scripts is enough, the binary ships in its bin/) and solcjs 0.8.28 for contracts/build.mjs; the
# official x402 TypeScript client (@x402/fetch + @x402/evm + viem) into .tools/x402-ts for tests/interop; Express and
# method-override into .tools/express for the Express upstream of tests/proxy; as root,
# Debian's redis-server and chromium when missing.
# Idempotent: returns at once when the pinned versions are already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
SOLC_VERSION="0.8.28"
ANVIL_VERSION="1.7.1"
ANVIL_PKG="@foundry-rs/anvil-linux-amd64"
ANVIL_BIN="$TOOLS/node_modules/$ANVIL_PKG/bin/anvil"
SOLC_PKG_JSON="$TOOLS/node_modules/solc/package.json"
X402_TS_VERSION="2.27.0"
VIEM_VERSION="2.57.20"
X402_TS="$TOOLS/x402-ts"
EXPRESS_VERSION="5.3.0"
METHOD_OVERRIDE_VERSION="3.0.0"
EXPRESS="$TOOLS/express"

have_solc() {
    [ -f "$SOLC_PKG_JSON" ] && grep -q "\"version\": \"$SOLC_VERSION\"" "$SOLC_PKG_JSON"
}

# The tests start their own redis-server on a free port; Debian ships it (apt does not start it).
if ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "redis-server is required: sudo apt-get install redis-server" >&2; exit 1
    fi
fi

# The paywall tests drive Debian's headless Chromium over the DevTools protocol (tests/paywall/cdp.py): no driver,
# no browser download at test time.
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "chromium is required for the paywall tests: sudo apt-get install chromium" >&2; exit 1
    fi
fi

have_x402_ts() {
    [ -f "$X402_TS/node_modules/@x402/fetch/package.json" ] &&
        grep -q "\"version\": \"$X402_TS_VERSION\"" "$X402_TS/node_modules/@x402/fetch/package.json"
}

# An Express upstream for tests/proxy (Express routes on the raw path, unlike Starlette): its own directory too.
have_express() {
    [ -f "$EXPRESS/node_modules/express/package.json" ] &&
        grep -q "\"version\": \"$EXPRESS_VERSION\"" "$EXPRESS/node_modules/express/package.json" &&
        [ -f "$EXPRESS/node_modules/method-override/package.json" ]
}

if [ -x "$ANVIL_BIN" ] && have_solc && have_x402_ts && have_express; then
    echo "tools already installed in $TOOLS"
    exit 0
fi

command -v npm >/dev/null || { echo "npm is required (install Node.js >= 18)" >&2; exit 1; }
mkdir -p "$TOOLS"
# A package.json of its own keeps npm from walking up and touching anything else in the repo.
[ -f "$TOOLS/package.json" ] || echo '{"name": "x402-gateway-tools", "private": true}' > "$TOOLS/package.json"
if ! [ -x "$ANVIL_BIN" ] || ! have_solc; then
    npm install --prefix "$TOOLS" --ignore-scripts --no-audit --no-fund "$ANVIL_PKG@$ANVIL_VERSION" "solc@$SOLC_VERSION"
    chmod +x "$ANVIL_BIN"
fi
"$ANVIL_BIN" --version | head -n 1

# The buyer's side most x402 apps use, for tests/interop: a directory of its own so its dependencies stay apart.
if ! have_x402_ts; then
    mkdir -p "$X402_TS"
    [ -f "$X402_TS/package.json" ] || echo '{"name": "x402-gateway-interop", "private": true}' > "$X402_TS/package.json"
    npm install --prefix "$X402_TS" --ignore-scripts --no-audit --no-fund \
        "@x402/fetch@$X402_TS_VERSION" "@x402/evm@$X402_TS_VERSION" "viem@$VIEM_VERSION"
fi

if ! have_express; then
    mkdir -p "$EXPRESS"
    [ -f "$EXPRESS/package.json" ] || echo '{"name": "x402-gateway-express-upstream", "private": true}' > "$EXPRESS/package.json"
    npm install --prefix "$EXPRESS" --ignore-scripts --no-audit --no-fund \
        "express@$EXPRESS_VERSION" "method-override@$METHOD_OVERRIDE_VERSION"
fi
