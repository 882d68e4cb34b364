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

.PHONY: setup demo test test-fast bench bench-quick bench-real lint browser postgres fashion-mnist clean

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

fashion-mnist:  ## Fashion-MNIST's IDX files for the real-data task `fashion-mnist` (Debian package, MIT)
	@ls /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "could not install dataset-fashion-mnist (needs root): the fashion-mnist task and its tests will fail"

demo: setup  ## the main job on the embedded default: stack up, patch every demo task, print results
	$(BIN)/deltapatch demo --project .demo

# pytest-xdist workers (CI has 2 cores); tests that share a stack or a cluster run on one (xdist_group)
TEST_WORKERS ?= 2

test: setup browser postgres fashion-mnist lint  ## lint, then every test, the slower end-to-end ones included
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: setup  ## unit tests only
	$(BIN)/pytest -q -m "not e2e"

bench: setup fashion-mnist  ## full benchmark table -> bench-results/
	$(BIN)/deltapatch bench --out bench-results

bench-quick: setup fashion-mnist
	$(BIN)/deltapatch bench --quick --out bench-results/quick

REAL_PROJECT := bench-results/real/project
bench-real: setup fashion-mnist  ## the ImageNet EfficientNet-Lite0 on real tasks with few shots (hours on a CPU; resumable)
	test -f $(REAL_PROJECT)/params.yaml || $(BIN)/deltapatch init $(REAL_PROJECT) --input-size 64
	cd $(REAL_PROJECT) && $(CURDIR)/$(BIN)/deltapatch bench --shots 5,10,25,100,full --seeds 3 --resume --out ..

lint: setup  ## ruff on everything, mypy on the library and the flows (settings: pyproject [tool.mypy])
	$(BIN)/ruff check deltapatch flows tests
	$(BIN)/mypy

clean:
	rm -rf .demo bench-results test-artifacts .pytest_cache .ruff_cache
