# The two commands a newcomer needs: `make demo` and `make test`.
# Everything beyond Rust and Python is installed here, pinned, into the project tree (.venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
TOOLS_STAMP := $(VENV)/.installed
NODE_STAMP := tests/interop/node_modules/.installed

.PHONY: help tools demo test fmt lint unit clean

help:
	@echo "make demo   build, start the local emulators and replay the sample story"
	@echo "make test   formatting, lints, unit and end-to-end tests against local emulators"
	@echo "make tools  install the pinned local tools into .venv and tests/interop (done by demo and test)"

# Pinned Python tools (moto server) in a project-local virtual environment.
$(TOOLS_STAMP): tests/requirements.txt
	@echo "==> installing pinned tools into .venv"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	@touch $@

# The official Azure IoT Node.js SDK, pinned by package-lock.json, for the interop test.
$(NODE_STAMP): tests/interop/package.json tests/interop/package-lock.json
	@echo "==> installing pinned Node.js packages into tests/interop/node_modules"
	cd tests/interop && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

tools: $(TOOLS_STAMP) $(NODE_STAMP)

demo: tools
	cargo run --quiet --package local-emulators --bin demo

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings

test: tools lint
	cargo test --workspace

clean:
	cargo clean
	rm -rf $(VENV)
