# Set-up and common commands. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch by default (small, on this project's machines); on a GPU machine use
# e.g. `make setup TORCH=torch` (the default CUDA build of the newest torch).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# pytest-xdist workers for `make test` (one module per worker at a time: module fixtures run once)
WORKERS ?= 2

.PHONY: setup demo test test-fast lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/detox-exp experiment=demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q -n $(WORKERS) --dist loadscope

test-fast: setup
	$(BIN)/pytest -q -n $(WORKERS) --dist loadscope -m "not slow"

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
