# make finetune compress export   -> the whole pipeline on the embedded default data
# make serve                      -> HTTP inference server over run.dir/export
# make test                       -> the test suite
# Same CONFIG/ARGS for every stage:  make finetune CONFIG=my.yaml ARGS="data.root=/photos finetune.epochs=5"
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
ARGS ?=
NPROC ?= 1
STAMP := $(VENV)/.installed

.PHONY: all finetune compress export serve test bench clean-run help

all: finetune compress export

help:
	@sed -n '1,5p' Makefile

# The virtual environment is created and filled on first use (and refreshed when pyproject.toml changes).
$(STAMP): pyproject.toml
	@test -n "$(PYTHON_BOOT)" || { echo "Python 3.10+ is needed (python3.11 recommended)"; exit 1; }
	@$(PYTHON_BOOT) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed, found " + sys.version)'
	@echo "[make] setting up $(VENV) (first run only; torch is large, this takes a few minutes)"
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@$(PY) -m pip install -q -e ".[dev]" 2>&1 | { grep -v "is ignored" || true; }
	@touch $(STAMP)

finetune compress export: $(STAMP)
ifeq ($(NPROC),1)
	$(PY) -m pipeline $@ --config $(CONFIG) $(ARGS)
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m pipeline $@ --config $(CONFIG) $(ARGS)
endif

serve: $(STAMP)
	$(PY) -m pipeline serve --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/finetune_bench.py

clean-run:
	rm -rf runs/default
