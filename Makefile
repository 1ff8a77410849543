# Two commands for a fresh machine: `make demo` and `make test`. Re-running them is fast:
# each step below is skipped while its inputs are unchanged.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install frontend chromium lint typecheck schema pytest bench-load clean

demo: install frontend
	$(BIN)/python manage.py up --seed-demo

test: install frontend chromium lint typecheck schema pytest

install: $(VENV)/.deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: with torch already installed nothing later can pull a multi-GB CUDA build.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	touch $@

$(VENV)/.deps: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[test]" "$(TORCH)"
	touch $@

frontend: frontend/dist/.built

frontend/node_modules/.package-lock.json: frontend/package-lock.json
	cd frontend && npm ci --no-audit --no-fund --loglevel=error

frontend/dist/.built: frontend/node_modules/.package-lock.json $(wildcard frontend/src/*) frontend/package.json
	cd frontend && npm run --silent build
	touch $@

chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	RL_SKIP_EMBEDDED_START=1 $(BIN)/lint-imports

typecheck: install
	RL_SKIP_EMBEDDED_START=1 $(BIN)/mypy .

# Clients are generated from /api/schema/: it must build with zero warnings (no database needed).
schema: install
	RL_SKIP_EMBEDDED_START=1 $(BIN)/python manage.py spectacular --validate --fail-on-warn --file /dev/null

pytest: install frontend chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench-load: install
	$(BIN)/python bench/annotation_load.py --help

clean:
	rm -rf $(VENV) frontend/node_modules frontend/dist
