# The two set-up commands in README.md are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint bench
setup:
	bash deploy/cpu/install.sh

# Sentinel guarding a real vLLM (CPU) on the project's tiny model.
demo: setup
	$(VENV)/bin/sentinel run --config deploy/cpu/sentinel.yaml

# The whole suite: unit tests, then the tests against the real engine.
test: setup
	$(PY) -m ruff check sentinel tests bench dashboards alerts fuzz
	SENTINEL_REQUIRE_ENGINE=1 $(PY) -m pytest -q -rs --durations=20 tests

test-fast:
	$(PY) -m pytest -q -m "not real" tests

lint:
	$(PY) -m ruff check sentinel tests bench dashboards alerts fuzz
	$(PY) -m ruff format --check sentinel tests bench dashboards alerts fuzz

# The CPU benchmarks, each against its baseline in the same run (bench.gpu needs a GPU with NVML).
bench: setup
	$(PY) -m bench.supervisor
	$(PY) -m bench.metrics
	$(PY) -m bench.proxy --start-vllm
	$(PY) -m bench.relay_floor
