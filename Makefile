# Two entry points that do all the set-up themselves on a fresh machine:
#   make demo   -> the main job on the embedded demo world
#   make test   -> the test suite (8 fake CPU devices)
PYTHON ?= python3
VENV ?= .venv
TF4_VENV ?= .venv-tf4
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU build (a plain "torch" would pull a multi-GB CUDA build).
TORCH := torch==2.13.0
# Test processes (pytest-xdist): two keep both cores busy through compilations and Python work.
TEST_WORKERS ?= 2

.PHONY: demo test setup bench mutation clean-venv

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[torch,eval,test]"
	# open_clip ships the CLIP BPE vocabulary the tests build a real tokenizer from; only the
	# data file is used (no torchvision), so its dependencies are not installed.
	$(BIN)/pip install -q --no-deps open_clip_torch
	touch $@

# A second, small environment with transformers 4.x: exported folders must load there too.
$(TF4_VENV)/.installed:
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/pip install -q --upgrade pip
	$(TF4_VENV)/bin/pip install -q "$(TORCH)" "transformers==4.57.*" safetensors numpy
	touch $@

setup: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/hirm-jax demo --workdir workdirs/demo

test: $(BIN)/.installed $(TF4_VENV)/.installed
	HIRM_JAX_NO_SKIP=1 HIRM_TF4_PYTHON=$(CURDIR)/$(TF4_VENV)/bin/python $(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) tests

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_encoder.py
	$(BIN)/python bench/bench_erase.py
	$(BIN)/python bench/bench_batch.py
	$(BIN)/python bench/bench_batch.py --n 256 --chunk 64
	$(BIN)/python bench/bench_report.py
	$(BIN)/python bench/bench_many.py
	$(BIN)/python bench/bench_t5.py
	$(BIN)/python bench/bench_t5_memory.py --json workdirs/bench_t5_memory.json

# Mutation testing of the core modules (hours on 2 cores; not in CI): tests/mutation.py.
mutation: $(BIN)/.installed
	$(BIN)/python tests/mutation.py --out workdirs/mutation

clean-venv:
	rm -rf $(VENV) $(TF4_VENV)
