# Two commands matter: `make run` (demo: whole nightly DAG once) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
# One JWT secret and Fernet key shared by every Airflow component (generated once, git-ignored;
# variables already in the environment win). AIRFLOW_ENV loads them into a recipe's shell.
AIRFLOW_SECRETS ?= $(CURDIR)/airflow-secrets.env
AIRFLOW_ENV := set -a; . "$(AIRFLOW_SECRETS)"; set +a;
# The demo's user-id pseudonymisation key (README, "Pseudonymised ids"): generated once,
# git-ignored, outside the data dir; RECS_PSEUDONYM_KEY or RECS_PSEUDONYM_KEY_FILE already set
# win. PSEUDONYM_ENV exports it into the demo's and `make airflow`'s shells (not `make test`).
PSEUDONYM_KEY ?= $(CURDIR)/.recs-pseudonym.key
PSEUDONYM_ENV := export RECS_PSEUDONYM_KEY_FILE="$${RECS_PSEUDONYM_KEY_FILE:-$(PSEUDONYM_KEY)}";

export AIRFLOW_HOME := $(CURDIR)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export GX_ANALYTICS_ENABLED := false
export OPENBLAS_NUM_THREADS := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export PYTHONWARNINGS := ignore::DeprecationWarning,ignore::FutureWarning

.PHONY: help install run test test-unit airflow mlflow bench lint lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv, install the locked requirements and this project (no-op when up to date)

$(AIRFLOW_SECRETS):
	@$(PYTHON) -m pipeline.cli airflow-secrets "$@"

$(PSEUDONYM_KEY):
	@$(PYTHON) -m pipeline.cli pseudonym-key "$@"

$(STAMP): requirements-dev.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the locked requirements into $(VENV) (about a minute with a warm pip cache)"
	@set -o pipefail; $(BIN)/python -m pip install --quiet --disable-pip-version-check \
	  --require-hashes --no-deps -r requirements-dev.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
	@rm -f "$$($(BIN)/python -c 'import site; print(site.getsitepackages()[0])')/recs-pipeline.pth"
	@set -o pipefail; $(BIN)/python -m pip install --quiet --disable-pip-version-check \
	  --no-deps --no-build-isolation --editable . 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(BIN)/python -m pip check > /dev/null || { $(BIN)/python -m pip check; exit 1; }
	@touch $(STAMP)

run: install $(AIRFLOW_SECRETS) $(PSEUDONYM_KEY)  ## the demo: the nightly DAG, the monitor, a simulated CMS day and its impact (DATE=YYYY-MM-DD to choose the day)
	@$(AIRFLOW_ENV) $(BIN)/airflow db migrate > /dev/null
	@$(BIN)/python -m pipeline.cli demo-data
	@$(AIRFLOW_ENV) $(PSEUDONYM_ENV) date=$${DATE:-$$($(BIN)/python -m pipeline.cli default-date)}; \
	 echo "running recommendations_nightly for $$date (log: logs/make-run.log)"; \
	 mkdir -p logs; \
	 if ! $(BIN)/airflow dags test recommendations_nightly $$date > logs/make-run.log 2>&1; then \
	   grep -E "^[A-Za-z_.]+(Error|Exception|Failed)[A-Za-z]*: " logs/make-run.log \
	     | sort -u | tail -n 5; \
	   echo "the run failed; full log: logs/make-run.log"; exit 1; \
	 fi; \
	 $(BIN)/python -m pipeline.cli summary $$date; \
	 echo "running recommendations_monitor for $$date (log: logs/make-run-monitor.log)"; \
	 if ! $(BIN)/airflow dags test recommendations_monitor $$date > logs/make-run-monitor.log 2>&1; then \
	   echo "the monitor failed; full log: logs/make-run-monitor.log"; exit 1; \
	 fi; \
	 $(BIN)/python -m pipeline.cli monitor-summary $$date; \
	 next=$$($(BIN)/python -c "import datetime as d, sys; print(d.date.fromisoformat(sys.argv[1]) + d.timedelta(days=1))" $$date); \
	 echo "simulating the CMS on $$date (feedback on the lists served) and ingesting it"; \
	 $(BIN)/python -m pipeline.cli simulate-day $$date || exit 1; \
	 $(BIN)/python -m pipeline.cli ingest > logs/make-run-ingest.json 2> logs/make-run-ingest.log \
	   || { tail -n 5 logs/make-run-ingest.log; exit 1; }; \
	 echo "running recommendations_impact for $$next (log: logs/make-run-impact.log)"; \
	 if ! $(BIN)/airflow dags test recommendations_impact $$next -c '{"days": 1}' > logs/make-run-impact.log 2>&1; then \
	   echo "the impact run failed; full log: logs/make-run-impact.log"; exit 1; \
	 fi; \
	 $(BIN)/python -m pipeline.cli impact-summary $$next

# --durations: the slowest tests close the report (the suite's 10-minute budget is theirs to keep)
test: install  ## run the whole test suite (needs PostgreSQL on 127.0.0.1:5432)
	$(BIN)/python -m pytest -q --durations=25

test-unit: install  ## the fast unit tests only
	$(BIN)/python -m pytest -q tests/unit tests/dags

airflow: install $(AIRFLOW_SECRETS) $(PSEUDONYM_KEY)  ## start Airflow: scheduler, DAG processor, triggerer, UI on http://127.0.0.1:8080 (login: README)
	@$(AIRFLOW_ENV) $(BIN)/airflow db migrate > /dev/null
	@$(AIRFLOW_ENV) $(PSEUDONYM_ENV) exec $(BIN)/airflow standalone

mlflow: install  ## open the MLflow UI on the project's tracking store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000

bench: install  ## benchmarks: speed and quality numbers (not part of make test)
	$(BIN)/python -m benchmarks

lint: install  ## static checks: ruff (lint and format), and mypy on pipeline/ (pyproject.toml)
	$(BIN)/ruff check pipeline dags tests benchmarks
	$(BIN)/ruff format --check pipeline dags tests benchmarks
	$(BIN)/mypy

# `make lock` keeps the pins already in the lock files; `make lock UPGRADE=1` moves every
# package to the newest version pyproject.toml allows. Runtime and development locks apart:
# a deployment installs requirements.lock, a development machine requirements-dev.lock (the
# same runtime pins plus the tools).
LOCK_FLAGS = --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --generate-hashes --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade)

lock: install  ## re-resolve requirements.lock and requirements-dev.lock (hashed) from pyproject.toml
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev -c requirements.lock $(LOCK_FLAGS) \
	  -o requirements-dev.lock

clean:  ## remove local state (data, stores, logs); keeps .venv
	rm -rf data logs airflow.db mlflow.db mlartifacts mlruns  # airflow-secrets.env stays
