# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench install

$(BIN)/xds: pyproject.toml protos/hatch_build.py protos/roots.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/xds

install: $(BIN)/xds

demo: install
	$(BIN)/xds demo

lint: install
	$(BIN)/ruff check xds tests bench protos
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q -rs

bench: install
	$(BIN)/python bench/snapshot_build.py
	$(BIN)/python bench/propagation.py --mode ads --mode xds --mode delta-ads --mode delta
	$(BIN)/python bench/tracing_overhead.py
