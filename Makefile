# The two commands: `make run` (the whole local stack) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint unit soak bench token package clean system

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m local run

# Debian's chromium (browser tests) and podman with its local base image (container
# test), each installed only when missing (apt-get: run as root, as CI does).
system:
	bash .ci/browser.sh
	bash .ci/podman.sh

test: $(STAMP) system
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -m "not soak and not isolated"
	$(VENV)/bin/pytest -q -m isolated

unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The reliability suite at full size (tests/reliability; prints its table, writes
# reliability-results.json). `make test` runs its fast part.
soak: $(STAMP)
	$(VENV)/bin/pytest -q -m soak tests/reliability -p no:randomly

token: $(STAMP)
	$(PY) -m local token $(or $(USER_NAME),demo)

# Every hot path beside its ceiling (README "Performance"); BENCH_ARGS="--quick drain".
bench: $(STAMP)
	$(PY) -m local bench $(BENCH_ARGS)

# SAM template (.chalice/package/$(STAGE)/sam.json) + deployment.zip; README "Deploy to AWS".
STAGE ?= prod
package: $(STAMP)
	$(PY) -m local.package --stage $(STAGE)

clean:
	rm -rf $(VENV) local/.run .pytest_cache .ruff_cache
