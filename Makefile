# mro-edge: the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Every install takes the locked versions in constraints.txt (see `make lock`).
CONSTRAINTS := constraints.txt

.PHONY: install run test test-all bench lint lock clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## run: embedded broker + every service + device simulators (Ctrl-C stops)
run: $(STAMP)
	$(BIN)/mro-edge run --simulate

# Test processes `make test` runs at once (pytest-xdist). Most tests wait on brokers, services
# and gateways they started, so 3 workers keep 2 cores busy; TEST_WORKERS=0 runs in one process.
# loadfile: the tests of one file run on one worker, in file order (one module-scoped stack each).
TEST_WORKERS ?= 3
# Run alone afterwards, in one process: their 10,000-record sends outrun the devices' resend
# timeout when other tests share the cores, and the resends then pile up past the test's bound.
TEST_ALONE := tests/integration/test_reconcile.py

## test: the whole suite against real brokers (embedded and Mosquitto); slow soak tests bounded
test: $(STAMP)
	scripts/ensure-tools
	scripts/ensure-postgres
	$(BIN)/pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15 \
	  $(foreach path,$(TEST_ALONE),--ignore=$(path))
	$(BIN)/pytest -q -m "not slow" --durations=5 $(TEST_ALONE)

## test-all: also the long soak and crash tests
test-all: $(STAMP)
	scripts/ensure-tools
	scripts/ensure-postgres
	$(BIN)/pytest -q --durations=15

bench: $(STAMP)
	scripts/ensure-tools
	scripts/ensure-postgres
	$(BIN)/python -m bench

## lint: ruff (rules in pyproject.toml) on everything, mypy on shared/, services/ and mro_edge/
lint: $(STAMP)
	$(BIN)/ruff check shared services mro_edge tests bench
	$(BIN)/mypy shared services mro_edge

## lock: re-resolve pyproject.toml's dependencies in a fresh virtualenv into constraints.txt
lock:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT \
	 && $(PYTHON) -m venv "$$tmp/venv" \
	 && "$$tmp/venv/bin/pip" install --quiet --upgrade pip \
	 && "$$tmp/venv/bin/pip" install --quiet '.[test]' \
	 && { grep '^#' $(CONSTRAINTS); "$$tmp/venv/bin/pip" freeze --all --exclude mro-edge --exclude setuptools; } \
	    > "$$tmp/constraints.txt" \
	 && mv "$$tmp/constraints.txt" $(CONSTRAINTS)

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
