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

.PHONY: venv smoke test lint bench clean chromium

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

smoke: venv
	$(VENV)/bin/tinymars run --profile smoke --home $(HOME_DIR)

# The report test screenshots report.html in headless Chromium; install it when missing and we are root
# (CI), otherwise that one test skips with the reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || { test "$$(id -u)" = 0 && apt-get update -qq \
		&& apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: the report screenshot test will skip"

# Two pytest-xdist workers, a test file each at a time (module fixtures stay whole); each worker has its own
# temporary PREFECT_HOME and Prefect harness (tests/conftest.py). TEST_WORKERS=1 runs the files in one process.
TEST_WORKERS ?= 2
test: venv chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) bench/rerun.py

clean:
	rm -rf $(VENV) $(HOME_DIR) .prefect .pytest_cache .ruff_cache

# torch_xla pins torch 2.9, so the XLA path gets its own environment (~7 GB with the CUDA wheels torch
# 2.9 pulls, ~3 min). It lives inside .venv/ (ignored by git, removed by `make clean`). Not part of `make test`.
XLA_VENV  := $(VENV)/xla
XLA_STAMP := $(XLA_VENV)/.installed

$(XLA_STAMP):
	@test -x $(XLA_VENV)/bin/python || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(XLA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.9.0 torch_xla==2.9.0 \
		numpy safetensors pyarrow pyyaml "pydantic>=2.7,<3" pytest
	@touch $(XLA_STAMP)

.PHONY: test-xla
test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m pytest -q -s -p no:cacheprovider tests/xla

# The offline rehearsal of the production profile (app/rehearse.py) as a test: every stage on iter7's shapes
# with the offline teacher and embedder, 2 training steps. Minutes on a laptop; not part of `make test`.
.PHONY: rehearse
rehearse: venv
	TINYMARS_REHEARSAL=1 $(PY) -m pytest -q tests/test_rehearsal.py
