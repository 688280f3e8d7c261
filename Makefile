# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv on first use and installs exactly the versions in requirements/dev.txt
# (hashes checked), then olmd itself from this checkout.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/dev.txt
PIP_TOOLS := pip-tools==7.7.0

.PHONY: demo test lint bench bench-fleet bench-tenants bench-sync lock test-latest clean

$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
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

bench-tenants: $(STAMP)
	$(BIN)/python bench/tenants.py

bench-sync: $(STAMP)
	$(BIN)/python bench/sync.py

# The newest versions pyproject.toml's ranges allow, in the lock. Run `make test-latest`
# first: it shows what the next lock would break. pip-tools runs in a venv of its own;
# the machine's pip configuration is ignored so the lock names PyPI's files only.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet $(PIP_TOOLS)
	env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
	    PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make lock" \
	    .venv-lock/bin/pip-compile --quiet --upgrade --generate-hashes --allow-unsafe \
	    --strip-extras --extra test --extra lint --index-url https://pypi.org/simple \
	    --no-emit-index-url --no-emit-find-links --output-file $(LOCK) \
	    pyproject.toml requirements/bootstrap.in

# The suite against the newest versions the ranges allow, in a venv of its own (no lock):
# a new release that breaks olmd shows here before it reaches the lock. Not part of CI.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --upgrade -e '.[test,lint]'
	OLMD_UNLOCKED=1 .venv-latest/bin/pytest -x -q

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .pytest_cache .mypy_cache .ruff_cache
