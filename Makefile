# The two commands a newcomer needs; both set up (or reuse) the virtual environment first.
VENV := $(or $(VIRTUAL_ENV),.venv)

.PHONY: quickstart test lint setup

setup:
	@bash scripts/setup_env.sh

quickstart: setup
	$(VENV)/bin/mm1 quickstart

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
