# `make smoke` and `make test` each create or update .venv, then do their job.
# torch goes in first, on its own: the CPU build 2.13.0; a dependency resolving torch by itself
# would pull the newest CUDA build (gigabytes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOME_DIR ?= .tinymars
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv smoke test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

smoke: venv
	$(VENV)/bin/tinymars run --profile smoke --home $(HOME_DIR)

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) bench/rerun.py

clean:
	rm -rf $(VENV) $(HOME_DIR) .prefect .pytest_cache .ruff_cache
