# deltapatch — the two Quickstart commands are `make demo` and `make test`; both install first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1

.PHONY: setup demo test test-fast bench bench-quick lint browser postgres clean

setup: $(STAMP)  ## create .venv and install the project (a second run takes seconds)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

browser:  ## headless Chromium for the MLflow UI test (Debian package)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium (needs root): the MLflow UI test will fail"

postgres:  ## PostgreSQL server binaries for the `stack.database: postgres` tests (Debian package)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null) \
		|| echo "could not install postgresql (needs root): the PostgreSQL stack tests will fail"

demo: setup  ## the main job on the embedded default: stack up, patch every demo task, print results
	$(BIN)/deltapatch demo --project .demo

# pytest-xdist workers (CI has 2 cores); tests that share a stack or a cluster run on one (xdist_group)
TEST_WORKERS ?= 2

test: setup browser postgres lint  ## lint, then every test, the slower end-to-end ones included
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: setup  ## unit tests only
	$(BIN)/pytest -q -m "not e2e"

bench: setup  ## full benchmark table -> bench-results/
	$(BIN)/deltapatch bench --out bench-results

bench-quick: setup
	$(BIN)/deltapatch bench --quick --out bench-results/quick

lint: setup  ## ruff on everything, mypy on the library and the flows (settings: pyproject [tool.mypy])
	$(BIN)/ruff check deltapatch flows tests
	$(BIN)/mypy

clean:
	rm -rf .demo bench-results test-artifacts .pytest_cache .ruff_cache
