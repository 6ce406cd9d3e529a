# sdbatch developer commands. A fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
DEMO_OUT ?= demo-output

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled

.PHONY: setup test demo lint clean

setup: $(STAMP)

# torch first: `torch==2.13.0` resolves to the CPU build on disk; letting another package pull
# torch in would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

test: setup
	$(PY) -m ruff check sd_core connectors jobs tests
	$(PY) -m pytest -q

demo: setup
	$(PY) -m jobs.demo --output $(DEMO_OUT)

lint: setup
	$(PY) -m ruff check sd_core connectors jobs tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
