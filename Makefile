# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the project into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: all install test lint unit integration demo bench bench-stream clean

all: test

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check meter tests bench
	$(BIN)/ruff format --check meter
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not integration"

integration: $(STAMP)
	$(BIN)/pytest -m integration

test: lint $(STAMP)
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/meter demo

bench: $(STAMP)
	$(BIN)/python -m bench.bench_rate --events 1000000

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache bench/out

bench-stream: $(STAMP)
	$(BIN)/python -m bench.bench_stream --events 200000
