# The two commands of a fresh machine (README.md): `make run` trains the embedded default, `make test` runs the
# tests. Both create the project virtualenv (.venv) first if it is missing or older than the install lists.
#   make run ARGS="+recipe=counsel_chat_tiny"     train.py with overrides
#   make test-fast                                 the tests without the slow ones (while developing)
#   make TORCH=torch test                          a GPU machine: torch's default (CUDA) build + requirements-gpu.txt
#   make upgrade-lock                              move requirements.lock to today's newest allowed versions, then test
#   make smollm2                                   a real chat model (SmolLM2-135M-Instruct) into cache/models/
# Every install is pinned by requirements.lock (constraints: the versions CI tested), so a commit installs and
# tests the same on any day; requirements.txt keeps the ranges.
PYTHON ?= python3
VENV ?= .venv
CPU_TORCH := torch==2.13.0
TORCH ?= $(CPU_TORCH)
LOCK ?= requirements.lock
PYTEST_ARGS ?=
BIN := $(VENV)/bin
# CUDA-only packages (Liger's Triton kernels) only where torch is not the CPU build
GPU_REQS := $(if $(filter $(CPU_TORCH),$(TORCH)),,-r requirements-gpu.txt)

.PHONY: install run test test-fast upgrade-lock smollm2

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-gpu.txt pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) "$(TORCH)" -r requirements.txt $(GPU_REQS)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

run: install
	$(BIN)/python train.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow" $(PYTEST_ARGS)

# A fresh virtualenv from the ranges alone (no lock), frozen into $(LOCK), then the whole suite on it
upgrade-lock:
	PYTHON=$(PYTHON) TORCH="$(CPU_TORCH)" scripts/upgrade_lock.sh $(LOCK)
	$(MAKE) test

smollm2: install
	$(BIN)/python scripts/get_model.py
