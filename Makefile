# The two commands: `make run` (the whole local stack) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint unit soak bench token clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m local run

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -m "not soak"

unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .

token: $(STAMP)
	$(PY) -m local token $(or $(USER_NAME),demo)

clean:
	rm -rf $(VENV) local/.run .pytest_cache .ruff_cache
