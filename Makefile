# Every target sets up its own virtual environment first (pinned versions from pyproject.toml).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast lint format bench clean

setup: $(STAMP)

# torch is installed on its own first so that pip takes the pinned CPU build and never
# resolves an unpinned CUDA build through another package's requirement.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check ernie bench tests
	$(VENV)/bin/ruff format --check ernie bench tests

format: $(STAMP)
	$(VENV)/bin/ruff check --fix ernie bench tests
	$(VENV)/bin/ruff format ernie bench tests

# GPU figures: run on a CUDA machine; writes out/bench/*.json
bench: $(STAMP)
	$(PY) bench/model_step.py --compile

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out
