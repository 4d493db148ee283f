# vein2vein — the two commands: `make run` and `make test`. Everything bootstraps itself:
# a pinned uv is installed into .tools/ from PyPI, then `uv sync --locked` builds .venv/.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(shell command -v $(PYTHON))
export UV_PROJECT_ENVIRONMENT := $(VENV)
# bytecode compiled once at install, and cached for our own modules and tests (assertion rewriting
# included), even where the environment says not to write it: every run would compile everything again
export UV_COMPILE_BYTECODE := 1
unexport PYTHONDONTWRITEBYTECODE

PYTEST_ARGS ?=

.PHONY: help bootstrap run demo test test-unit test-integration test-e2e lint format typecheck clean trace bench chaos audit-verify

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(UV):
	@echo "bootstrap: installing uv $(UV_VERSION) into $(TOOLS)/"
	@$(PYTHON) -m venv $(TOOLS)
	@$(TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"

bootstrap: $(VENV)/.synced ## install the locked environment into .venv (uv sync --locked), when the lock changed

$(VENV)/.synced: uv.lock pyproject.toml $(wildcard libs/*/pyproject.toml services/*/pyproject.toml) | $(UV)
	@$(UV) sync --locked --quiet
	@touch $@

run: bootstrap ## start Postgres, the Kafka-compatible broker and the five services (Ctrl-C stops)
	@$(VENV)/bin/python -m v2v_harness run

demo: bootstrap ## play hospitals, couriers and sites for ORDERS orders (default 200) with EXCEPTIONS mix (default 0.2)
	@PYTHONPATH=tools/simulator $(VENV)/bin/python -m v2v_simulator --orders $(or $(ORDERS),200) --exceptions $(or $(EXCEPTIONS),0.2)

test: bootstrap ## the whole suite: unit, integration (real Postgres + broker) and end to end
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: bootstrap ## unit tests only (no I/O, on both cores; the integration and e2e folders are not collected)
	@$(VENV)/bin/pytest -n 2 -m "not integration and not e2e" --ignore-glob='*/integration/*' \
		--ignore=tests/e2e --hypothesis-profile=quick $(PYTEST_ARGS)

test-integration: bootstrap ## integration tests only
	@$(VENV)/bin/pytest -m integration $(PYTEST_ARGS)

test-e2e: bootstrap ## end-to-end tests only (five service processes)
	@$(VENV)/bin/pytest -m e2e $(PYTEST_ARGS)

lint: bootstrap ## ruff, mypy, the layer contracts (import-linter + shape check) and each package on its own
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy libs/*/src services/*/src
	@$(VENV)/bin/lint-imports --no-cache
	@$(VENV)/bin/python tools/lint/check_shape.py
	@tools/lint/check_packages.sh $(UV)

format: bootstrap ## apply ruff formatting and safe fixes
	@$(VENV)/bin/ruff check --fix .
	@$(VENV)/bin/ruff format .

trace: bootstrap ## print every trace of one order as a waterfall: make trace ORDER=<order_id>
	@if [ -z "$(ORDER)" ]; then echo "usage: make trace ORDER=<order_id>  (reads .v2v/telemetry/spans-*.jsonl)" >&2; exit 2; fi
	@$(VENV)/bin/python -m v2v_harness.trace_view --order "$(ORDER)"

bench: bootstrap ## open-model load test: raw limits, latency and CPU per rate, the knee (BENCH_ARGS="--smoke", "--help")
	@$(VENV)/bin/python -m v2v_harness.bench $(BENCH_ARGS)

chaos: bootstrap ## replicas + seeded nemesis + workload + checker: make chaos ORDERS=100 SECONDS=180 SEED=1 (docs/RELIABILITY.md)
	@PYTHONPATH=tools/simulator $(VENV)/bin/python -m v2v_harness chaos --orders $(or $(ORDERS),100) \
		--seconds $(or $(SECONDS),180) --seed $(or $(SEED),1) $(CHAOS_ARGS)

audit-verify: bootstrap ## verify every service's audit hash chain and its signed checkpoints (the platform's database must be up: make run)
	@$(VENV)/bin/python -m v2v_audit verify $(AUDIT_ARGS)

clean: ## remove the local state (database files, logs, telemetry) under .v2v/
	rm -rf .v2v
