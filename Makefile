# sdbatch developer commands. A fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
TORCH_VERSION := 2.13.0
DEMO_OUT ?= demo-output
# `make demo MODEL=path/or/s3/uri`: the demo pictures through your checkpoint instead of the tiny random model
MODEL ?=
# The Airflow DAG's tests (tests/airflow) run in a virtualenv of their own: Airflow's dependency set
# must not mix with the project's. deploy/airflow/constraints.txt pins the resolved set (Airflow's
# constraints approach; its published constraints files are not reachable from CI).
AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled

.PHONY: setup airflow-setup test demo bench bench-quick lint clean

setup: $(STAMP)

# torch first: `torch==2.13.0` resolves to the CPU build on disk; letting another package pull
# torch in would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

$(AIRFLOW_STAMP): deploy/airflow/requirements-test.txt deploy/airflow/constraints.txt
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install --quiet -r deploy/airflow/requirements-test.txt -c deploy/airflow/constraints.txt
	touch $(AIRFLOW_STAMP)

airflow-setup: $(AIRFLOW_STAMP)

test: setup airflow-setup
	$(PY) -m ruff check sd_core connectors jobs tests bench
	$(PY) -m ruff check deploy/airflow
	$(PY) -m pytest -q
	$(AIRFLOW_VENV)/bin/python -m pytest -q tests/airflow

demo: setup
	$(PY) -m jobs.demo --output $(DEMO_OUT) $(if $(MODEL),--model "$(MODEL)")

# Benchmarks: each prints a table and writes bench/results/<name>.json; the plot summarises them all.
$(BENCH_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench.core_vs_diffusers
	$(PY) -m bench.job_efficiency
	$(PY) -m bench.driver_memory
	$(PY) -m bench.cold_start
	$(PY) -m bench.plot

bench-quick: $(BENCH_STAMP)
	$(PY) -m bench.core_vs_diffusers --quick
	$(PY) -m bench.job_efficiency --quick
	$(PY) -m bench.driver_memory --quick
	$(PY) -m bench.cold_start --quick
	$(PY) -m bench.plot

lint: setup
	$(PY) -m ruff check sd_core connectors jobs tests bench
	$(PY) -m ruff check deploy/airflow

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
