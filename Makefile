# The two commands of a fresh machine (README.md): `make run` trains the embedded default, `make test` runs the
# tests. Both create the project virtualenv (.venv) first if it is missing or older than the install lists.
#   make run ARGS="+recipe=counsel_chat_tiny"     train.py with overrides
#   make test-fast                                 the tests without the slow ones (while developing)
#   make TORCH=torch test                          a GPU machine: torch's default (CUDA) build
#   make smollm2                                   a real pretrained model: cache/models/smollm2-135m-instruct
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: install run test test-fast smollm2

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

run: install
	$(BIN)/python train.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow" $(PYTEST_ARGS)

smollm2: install
	$(BIN)/python scripts/get_model.py
