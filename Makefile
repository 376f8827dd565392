# The two commands a newcomer needs: `make demo` and `make test`.
# Everything beyond Rust and Python is installed here, pinned, into the project tree (.venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
TOOLS_STAMP := $(VENV)/.installed
BUILD_TOOLS_STAMP := $(VENV)/.build-tools
NODE_STAMP := tests/interop/node_modules/.installed

# `cargo lambda` (pinned in tools/requirements-build.txt) lives in .venv/bin.
export PATH := $(VENV)/bin:$(PATH)
LOCAL_ENV := $(CURDIR)/target/local.env

.PHONY: help tools demo test fmt lint clean emulators watch invoke build deploy deploy-plan bench bench-storm mutants
DEPLOY_VENV := $(CURDIR)/.venv-deploy

help:
	@echo "make demo   build, start the local emulators and replay the sample story"
	@echo "make test   formatting, lints, unit and end-to-end tests against local emulators"
	@echo "make tools  install the pinned local tools into .venv and tests/interop, and Debian's Chromium (done by demo and test)"
	@echo "make emulators                          start the local stand-ins; writes target/local.env"
	@echo "make watch                              cargo lambda watch with local-replay and that env"
	@echo "make invoke FN=.. EVENT=.. [CONTEXT=..] cargo lambda invoke against the watch"
	@echo "make build  cargo lambda build --release --arm64 for every function"
	@echo "make bench  benchmarks against the Node.js baseline; writes bench/results.md"
	@echo "make bench-storm  a reboot storm of 10,000 SIMs (STORM_ARGS=--storm-sims N); writes bench/storm.md"
	@echo "make deploy-plan / make deploy   print / run the deployment (settings: infra/deploy.sh)"
	@echo "make mutants  mutation testing of the security rules (cargo-mutants, pinned; long, not in CI)"

# Pinned Python tools (moto server, SDKs, cargo-lambda) in a project-local virtual environment.
$(TOOLS_STAMP): tests/requirements.txt tools/requirements-build.txt
	@echo "==> installing pinned tools into .venv"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	@touch $@ $(BUILD_TOOLS_STAMP)

# Only what cross-compiling the functions needs: cargo-lambda and zig.
$(BUILD_TOOLS_STAMP): tools/requirements-build.txt
	@echo "==> installing cargo-lambda and zig into .venv"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tools/requirements-build.txt
	@touch $@

# The official Azure IoT Node.js SDK, pinned by package-lock.json, for the interop test.
$(NODE_STAMP): tests/interop/package.json tests/interop/package-lock.json
	@echo "==> installing pinned Node.js packages into tests/interop/node_modules"
	cd tests/interop && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Debian's Chromium and ChromeDriver, pinned (tests/browser-packages.txt), for the installers'
# page test in a real browser.
BROWSER_STAMP := $(VENV)/.browser
$(BROWSER_STAMP): tests/browser-packages.txt tests/install-browser.sh | $(TOOLS_STAMP)
	tests/install-browser.sh
	@touch $@

tools: $(TOOLS_STAMP) $(NODE_STAMP) $(BROWSER_STAMP)

demo: tools
	cargo run --quiet --package local-emulators --bin demo

emulators: tools
	cargo build --quiet --package fleet-device
	cargo run --quiet --package local-emulators --bin demo -- --serve $(LOCAL_ENV)

watch: tools
	@test -f $(LOCAL_ENV) || { echo "run 'make emulators' in another terminal first"; exit 1; }
	cargo lambda watch --invoke-address 127.0.0.1 --features local-replay --env-file $(LOCAL_ENV)

invoke: tools
	@test -n "$(FN)" -a -n "$(EVENT)" || { echo "usage: make invoke FN=azure-dps-register EVENT=events/azure-dps-register/register.json CONTEXT=events/azure-dps-register/client-context.json"; exit 2; }
	cargo lambda invoke $(FN) --invoke-address 127.0.0.1 --data-file $(EVENT) $(if $(CONTEXT),--client-context-file $(CONTEXT))

build: $(BUILD_TOOLS_STAMP)
	cargo lambda build --release --arm64 --output-format zip
	@ls -l $${CARGO_TARGET_DIR:-target}/lambda/*/bootstrap.zip | awk '{printf "%-60s %6.2f MB\n", $$9, $$5/1048576}'

# The benchmark baseline: the original write-up's Node.js Lambda and its SDKs, pinned.
BENCH_NODE_STAMP := bench/node/node_modules/.installed
$(BENCH_NODE_STAMP): bench/node/package.json bench/node/package-lock.json
	@echo "==> installing the pinned Node.js baseline into bench/node/node_modules"
	cd bench/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# BENCH_ARGS: --runs N --warm N --delayed-warm N --throughput-runs N (defaults 5, 20, 5, 3).
# The reboot storm (bench/storm.md): in-process, no release binaries needed. At the default
# 10,000 SIMs it runs for about 25 minutes (DPS's quota bounds two of its three ways).
bench-storm: tools
	cargo run --quiet --profile bench-harness --package local-emulators --bin bench -- --storm $(STORM_ARGS)

bench: build $(BENCH_NODE_STAMP)
	cargo build --release --package azure-dps-register --package fleet-prehook --package claim-issuer
	cargo run --quiet --profile bench-harness --package local-emulators --bin bench -- $(BENCH_ARGS)

# Mutation testing of the modules that decide who gets in (SECURITY.md records the score):
# the domain checks, the hook's rules, the Beam gate, azure-dps-register's SIM checks and
# limits, each with its own crate's unit tests (no server). cargo-mutants is pinned and built
# into .tools/ from crates.io. About an hour on 2 cores: not part of `make test`.
MUTANTS_VERSION := 26.2.0
MUTANTS := $(CURDIR)/.tools/bin/cargo-mutants
$(MUTANTS):
	cargo install --locked --quiet cargo-mutants --version $(MUTANTS_VERSION) --root $(CURDIR)/.tools

mutants: $(MUTANTS)
	mkdir -p target/mutants/domain target/mutants/fleet-prehook target/mutants/azure-dps-register
	$(MUTANTS) mutants --package domain --file shared/domain/src/sas.rs \
	  --file shared/domain/src/soracom.rs --file shared/domain/src/keys.rs \
	  --output target/mutants/domain
	$(MUTANTS) mutants --package fleet-prehook --file functions/fleet-prehook/src/handler.rs \
	  --output target/mutants/fleet-prehook
	$(MUTANTS) mutants --package azure-dps-register --file functions/azure-dps-register/src/beam.rs \
	  --file functions/azure-dps-register/src/handler.rs --file functions/azure-dps-register/src/state.rs \
	  --output target/mutants/azure-dps-register

# Deploy-time tools (AWS SAM CLI, AWS CLI), pinned, only for `make deploy`.
$(DEPLOY_VENV)/.installed: infra/requirements.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet --disable-pip-version-check -r infra/requirements.txt
	@touch $@

deploy-plan:
	@infra/deploy.sh --plan

deploy: $(BUILD_TOOLS_STAMP) $(DEPLOY_VENV)/.installed
	infra/deploy.sh

fmt:
	cargo fmt --all

lint: tools
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/cfn-lint infra/template.yaml

test: tools lint
	cargo test --workspace

clean:
	cargo clean
	rm -rf $(VENV)
