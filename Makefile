# Two commands for users: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Real data: DATA_DIR if set, else ../shared/data when it exists (tests skip real-data cases without it).
DATA_DIR ?= $(if $(wildcard ../shared/data/cifar100),$(abspath ../shared/data),)
export DATA_DIR

# Test workers: independent test files run in parallel (many tests wait on Ray, MLflow servers and
# subprocesses, so 3 workers keep 2 cores busy); each file stays on one worker with its fixtures, and
# the longest files start first (tests/conftest.py LONGEST_FIRST; xdist keeps that order with
# --no-loadscope-reorder).
TEST_WORKERS ?= 3
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: demo test quick lint install clean-runs

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

quick: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

# Every stage on a CIFAR-100 subset: a sweep (3 members, analysed), ANDC and its random control on
# the best trial, a committee of all three with the seed control, and the HTML report, which ends
# with a recap, the MLflow UI command and links.
demo: $(VENV)/.installed
	$(PY) -m orchestrator sweep configs/quick.yaml
	$(PY) -m orchestrator prune quick:best --methods andc,random --finetune-epochs 1
	$(PY) -m orchestrator committee --experiment quick --method topk --size 3
	$(PY) -m orchestrator report quick
	@echo "(mlflow is installed in $(VENV)/bin: run \`source $(VENV)/bin/activate\` first)"

clean-runs:
	rm -rf runs mlflow.db optuna.db mlartifacts
