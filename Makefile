# Strongroom: every target bootstraps what it needs (virtual environment, packages, Mosquitto).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint unit demo walkthrough bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@scripts/bootstrap-venv.sh "$(PYTHON)" "$(VENV)"
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest

test: venv
	@scripts/ensure-mosquitto.sh
	@scripts/ensure-chromium.sh
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest

demo: venv
	@scripts/ensure-mosquitto.sh || echo "(the demo falls back to its embedded broker)"
	$(VENV)/bin/strongroom demo

walkthrough: venv
	@scripts/walkthrough.sh "$(VENV)"

bench: venv
	@scripts/ensure-mosquitto.sh
	$(PY) bench/artifact_throughput.py
	$(PY) bench/enclave_cold_start.py
	$(PY) bench/verifier_throughput.py
	$(PY) bench/fleet_scale.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
