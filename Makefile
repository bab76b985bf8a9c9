# Tally — run `make help` for the targets. Everything installs into the repo:
# .venv/ (Python) and .tally/ (Kafka jars, local data), both git-ignored.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA_LIBS := .tally/kafka/libs
KUSTOMIZE_VERSION := v5.8.2
KUSTOMIZE := .tally/bin/kustomize
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-z][a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

setup: $(VENV)/.installed $(KAFKA_LIBS)/.installed ## Create .venv, install Tally + dev tools, fetch Kafka jars (idempotent)

test-tools: setup $(KUSTOMIZE).$(KUSTOMIZE_VERSION) browser ## What only the tests need: kustomize (Go) and headless Chromium

browser: ## Install Debian's headless Chromium when missing (for tests/e2e/test_dashboard.py)
	@command -v chromium >/dev/null || if [ "$$(id -u)" = 0 ]; then \
	  echo "setup: installing chromium (apt-get) for tests/e2e/test_dashboard.py"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium fonts-dejavu-core >/dev/null; \
	else echo "setup: chromium is missing; run: sudo apt-get install chromium"; fi

# Exactly the versions in requirements.lock (hashes checked), dev and bench tools
# included; Tally and native/ are built with the lock's setuptools and maturin, and
# native/ with its Cargo.lock (--locked). `make lock` is the one way to change them.
$(VENV)/.installed: requirements.lock pyproject.toml native/pyproject.toml native/Cargo.toml native/Cargo.lock native/src/*.rs
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@command -v cargo >/dev/null || { echo "setup: cargo is missing: native/ (the worker's \
	  native fold) builds with Rust; install it with rustup (https://rustup.rs)"; exit 1; }
	PATH="$(abspath $(BIN)):$$PATH" MATURIN_PEP517_ARGS=--locked $(BIN)/python -m pip install -q --no-deps --no-build-isolation ./native
	$(BIN)/python -m pip check
	touch $@

lock: ## Re-resolve requirements.lock (every Python dependency, hashed) and the image's deploy/requirements.lock
	test -x $(BIN)/uv || $(MAKE) --no-print-directory setup
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra bench --extra setup \
	  --universal --python-version 3.11 --generate-hashes --no-header --quiet --upgrade \
	  -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
	  --no-header --quiet -c requirements.lock -o deploy/requirements.lock
	cd native && cargo update
	@echo "lock: review and commit requirements.lock, deploy/requirements.lock and native/Cargo.lock, then make setup"

# Kafka runs from Maven Central jars on the machine's JDK: no download outside
# the package registries, no Docker.
$(KAFKA_LIBS)/.installed: deploy/kafka/pom.xml
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies \
	  -DoutputDirectory=$(abspath $(KAFKA_LIBS)) -DincludeScope=runtime
	touch $@

# kustomize, for tests/unit/deploy/test_manifests.py to build deploy/k8s exactly as
# `kubectl apply -k` would: built from the Go module proxy at a pinned version (about
# 3 minutes the first time on 2 cores, seconds once Go's caches hold it).
$(KUSTOMIZE).$(KUSTOMIZE_VERSION):
	@command -v go >/dev/null || { echo "setup: go is missing: the manifest tests build \
	  kustomize with it; install Go (https://go.dev/doc/install)"; exit 1; }
	GOBIN=$(abspath $(dir $(KUSTOMIZE))) go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
	touch $@

run: setup ## Bootstrap and run the whole stack with demo gateways (Ctrl-C stops it)
	$(BIN)/tally up --demo

test: test-tools ## Bootstrap and run lint, types and every test tier
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

unit: test-tools ## Run only the unit tests (no Kafka, no ClickHouse)
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

lint: ## ruff (lint + format check) and mypy strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: ## Format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

schema: ## Regenerate schemas/event.schema.json from the pydantic models
	$(BIN)/python -m schemas.jsonschema > schemas/event.schema.json

docs: ## Regenerate docs/configuration.md's table from the settings classes
	$(BIN)/python -m deploy.docs_sync

bench: setup ## Run the benchmark suite (not tests): a table, and benchmarks/results/latest.json
	@command -v wrk >/dev/null || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	  apt-get install -y -qq wrk; else echo "bench: wrk is missing (apt-get install wrk): the API bench needs it"; fi; }
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean: ## Remove local data (.tally/data) but keep installed jars and .venv
	rm -rf .tally/data

.PHONY: help setup test-tools lock browser run test unit lint fmt schema docs clean bench
