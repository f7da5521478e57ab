# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
ANVIL  := .tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil
X402TS := .tools/x402-ts/node_modules/@x402/fetch/package.json

.PHONY: setup demo test lint token bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

$(ANVIL) $(X402TS) &: scripts/install-tools.sh
	bash scripts/install-tools.sh
	touch $(ANVIL) $(X402TS)

setup: $(STAMP) $(ANVIL) $(X402TS)   ## venv with the package and test deps; anvil, solcjs, the x402 TS client in .tools/; redis-server

demo: setup                ## one real payment end to end: local chain, SQLite store, demo upstream
	$(BIN)/x402-gateway demo

test: setup                ## the whole test suite (real anvil, real redis-server, real sockets)
	$(BIN)/pytest -q

bench: setup               ## benchmarks: upstream alone, gateway, official x402 stack; ~4-6 min (bench/RESULTS.md)
	$(BIN)/python -m bench

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

token: setup               ## rebuild contracts_abi/ from contracts/*.sol (byte-identical to the committed artifacts)
	node contracts/build.mjs

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
