# The two commands a newcomer needs; both set up (or reuse) the virtual environment first.
VENV := $(or $(VIRTUAL_ENV),.venv)

.PHONY: quickstart test lint setup setup-dev

setup:
	@bash scripts/setup_env.sh

setup-dev:
	@bash scripts/setup_env.sh dev

quickstart: setup
	$(VENV)/bin/mm1 quickstart

test: setup-dev
	$(VENV)/bin/python -m pytest -q

lint: setup-dev
	$(VENV)/bin/ruff check src tests benchmarks
