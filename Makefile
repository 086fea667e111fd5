# The README's two commands: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
## Two pytest processes: most tests wait on servers, so the suite takes half the time.
PYTEST_ARGS ?= -n 2
PORT   ?=

.PHONY: demo test bench lint format system-packages clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.demo

## Run the proxy on the embedded default config with demo data (Ctrl+C stops it).
## `make demo PORT=8099` picks the port (default 8080).
demo: $(VENV)/.demo
	$(BIN)/fdp demo$(if $(PORT), --port $(PORT))

## Install everything the tests need (redis-server, chromium, mosquitto via apt-get when missing), check the style
## (ruff check, ruff format --check), then run the tests.
## pytest's exit code 5 (no tests collected) fails the target like any other failure.
test: $(VENV)/.test system-packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

## Benchmark the proxy against nginx and the upstream direct (writes bench/REPORT.md).
bench: $(VENV)/.test
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## System packages the tests run (a program and its Debian package), installed when missing.
SYSTEM_PACKAGES := redis-server:redis-server chromium:chromium /usr/sbin/mosquitto:mosquitto

system-packages:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing </dev/null; \
	  else \
	    echo "missing system packages:$$missing (Debian: sudo apt-get install$$missing)" >&2; exit 1; \
	  fi; }

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache *.egg-info
