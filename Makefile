# mro-edge: the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-all bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## run: embedded broker + every service + device simulators (Ctrl-C stops)
run: $(STAMP)
	$(BIN)/mro-edge run --simulate

## test: the whole suite against real brokers (embedded and Mosquitto); slow soak tests bounded
test: $(STAMP)
	scripts/ensure-tools
	scripts/ensure-postgres
	$(BIN)/pytest -q -m "not slow" --durations=15

## test-all: also the long soak and crash tests
test-all: $(STAMP)
	scripts/ensure-tools
	scripts/ensure-postgres
	$(BIN)/pytest -q --durations=15

bench: $(STAMP)
	scripts/ensure-tools
	scripts/ensure-postgres
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check shared services mro_edge tests bench

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
