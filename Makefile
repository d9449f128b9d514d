# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the project into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: all install test lint unit integration demo bench bench-stream bench-scale bench-scrape clean soak \
	soak-load soak-dates kafka

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

# Apache Kafka's broker jars (the version pinned in deploy/kafka/pom.xml), fetched from Maven
# Central once into .cache/kafka-<version>/libs and reused after; needs java and mvn.
kafka:
	deploy/kafka/fetch.sh

# Tests run in 4 processes (pytest-xdist; each integration process starts its own brokers on
# first use: the embedded Tansu and Apache Kafka, tests/integration/conftest.py): integration
# tests mostly wait on brokers and workers, so 4 fit on 2 cores.
# The slowest 20 are printed at the end.
PYTEST := $(BIN)/pytest -n 4 --durations=20

unit: $(STAMP)
	$(PYTEST) -m "not integration"

integration: $(STAMP) kafka
	$(PYTEST) -m integration

test: lint $(STAMP) kafka
	$(PYTEST)

# Does the suite hold on a busy machine and on any date? The integration tests 10 times
# beside 2 CPU hogs (stress-ng), then the whole suite at four dates (faketime): about an hour
# on 2 cores (see the README). soak-load and soak-dates run one half; SOAK_RUNS=3 fewer runs.
soak: $(STAMP)
	tests/soak.sh

soak-load: $(STAMP)
	tests/soak.sh load

soak-dates: $(STAMP)
	tests/soak.sh dates

demo: $(STAMP)
	$(BIN)/meter demo

# meter rate on today's profile and a provider's month (1 M workloads), one core and all
# cores, next to DuckDB on the same files (the extra "bench"; about 4 minutes).
bench: $(STAMP)
	@$(BIN)/python -c "import duckdb" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.bench_rate --events 1000000 --profile today --profile provider-1m \
		--duckdb --repeat 2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache bench/out

# HTTP at a provider's scale: 200,000 tenants, /metrics and /api/usage under 10 clients while
# events flow; RSS per tenant, /healthz latency, loop lag, fences (about 3 minutes).
bench-scrape: $(STAMP)
	$(BIN)/python -m bench.bench_scrape --tenants 200000 --events 200000

# Memory and restart of a worker's state with 1 and 12 months of a 1 M-workload fleet, with and
# without --state-dir (about 15 minutes; up to ~8 GB of memory for the 3 months without it).
bench-scale: $(STAMP)
	$(BIN)/python -m bench.bench_scale --workloads 1000000 --months 1 --months 3 --months 12 \
		--memory-months 3

# The worker on today's profile and a provider's month (1 M workloads): replay against a raw
# consumer, restart, and latency at 2,000 events/s (about 4 minutes). 3 M workloads:
# add --profile provider-3m (10 more minutes, ~7 GB of memory with the embedded broker).
bench-stream: $(STAMP)
	$(BIN)/python -m bench.bench_stream --events 200000 --profile today --profile provider-1m
