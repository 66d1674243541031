# Every target sets up its own virtual environment first (pinned versions from pyproject.toml).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# `make ui UI_PORT=5001` when 5000 is taken; `make run RUN_ARGS='serve.port=8001'` passes Hydra overrides
UI_PORT  ?= 5000
RUN_ARGS ?=

.PHONY: setup run test test-faults test-cluster test-quickstart test-fast ui lint format bench clean

setup: $(STAMP)

# torch is installed on its own first so that pip takes the pinned CPU build and never
# resolves an unpinned CUDA build through another package's requirement.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# the tiny pipeline end to end: data -> pretrain -> sft -> dpo -> quantize -> serve (CPU, local Ray)
run: $(STAMP)
	$(PY) -m pipeline run conf=tiny $(RUN_ARGS)

# the suite without the fault-injection and multi-node tests (its bound: 30 minutes on 2 cores), on
# TEST_WORKERS processes: a module's tests stay together (its fixtures are built once), and the second
# process fills the seconds the first spends waiting on Ray, subprocesses and servers
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -m "not faults and not cluster" -n $(TEST_WORKERS) --dist loadfile

# killed stages and workers, S3 errors, a full disk: each must end in the same artifacts or a clear error
test-faults: $(STAMP)
	$(PY) -m pytest -q -m faults

# a Ray head and a second Ray node on this machine, artifacts on S3 (moto): tests/cluster (a few minutes)
test-cluster: $(STAMP)
	$(PY) -m pytest -q -m cluster

# docs/quickstart.md on a fresh clone of HEAD (or: bash tests/quickstart.sh DIR): make run, make ui, the runs over HTTP
test-quickstart:
	bash tests/quickstart.sh

# the MLflow UI on the project's tracking store: http://127.0.0.1:5000 (UI_PORT)
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

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
