# Two entry points: `make main` runs the whole job on the embedded mock data, `make test` runs the tests.
# Both create .venv and install what they need (torch as the CPU wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv main test lint format clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

main: venv
	$(PY) examples/run_main_job.py --out report

lint: venv
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) report build *.egg-info
