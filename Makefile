# The project's commands. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check deps venv proto proto-check lint typecheck imports unit bench bench-quick clean

deps:
	bash deploy/install-deps.sh

$(STAMP): pyproject.toml | deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: deps $(STAMP)

demo: venv
	$(VENV)/bin/vim-demo

proto: venv
	$(PY) scripts/gen_proto.py

proto-check: venv
	$(PY) scripts/gen_proto.py --check

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy vim ha

imports: venv
	$(VENV)/bin/lint-imports

check: lint typecheck imports proto-check

test: venv check
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench-quick: venv
	$(PY) -m bench.eventlog --quick

bench: venv
	$(PY) -m bench.eventlog
	$(PY) -m bench.api
	$(PY) -m bench.failover
	$(PY) -m bench.scheduler
	$(PY) -m bench.agent
	$(PY) -m bench.alarms
	$(PY) -m bench.host_failover

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
