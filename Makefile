# Strongroom: every target bootstraps what it needs (virtual environment, packages, Mosquitto).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint unit demo walkthrough bench fuzz clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@scripts/bootstrap-venv.sh "$(PYTHON)" "$(VENV)"
	@touch $@

# lint-imports: the layer contracts in pyproject.toml ([tool.importlinter])
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

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

# Coverage-guided fuzzing of every parser (fuzz/run.py): FUZZ_SECONDS per harness. atheris is
# installed here only; `make test` runs the same targets as bounded hypothesis properties.
FUZZ_SECONDS ?= 30
fuzz: venv
	$(VENV)/bin/pip install --quiet 'atheris>=2.3'
	$(PY) -m fuzz.run --all --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
