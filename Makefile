# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv on first use and installs olmd into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-fleet clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/olmd demo

lint: $(STAMP)
	$(BIN)/ruff check daemon plugins tests bench
	$(BIN)/ruff format --check daemon plugins tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-fleet: $(STAMP)
	$(BIN)/python bench/fleet.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
