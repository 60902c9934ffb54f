# make finetune compress export   -> the whole pipeline on the embedded default data
# make serve                      -> HTTP inference server over run.dir/export
# make test                       -> the test suite
# Same CONFIG/ARGS for every stage:  make finetune CONFIG=my.yaml ARGS="data.root=/photos finetune.epochs=5"
# GPUs: make install GPU=1 (onnxruntime-gpu instead of onnxruntime); make finetune NPROC=4 (DDP on 4 GPUs);
#       several machines: NNODES=2 RDZV_ENDPOINT=host:29400 on each; make gpu-check (docs/gpu.md)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
ARGS ?=
NPROC ?= 1
NNODES ?= 1
RDZV_ENDPOINT ?=
RDZV_ID ?= edgepipe
STAMP := $(VENV)/.installed

# Which ONNX Runtime build the venv gets: the CPU one, or onnxruntime-gpu with GPU=1. Never both (they
# install the same folder). Sticky: once installed with GPU=1, plain `make` keeps the GPU build; switch
# back with `make install GPU=0`.
GPU ?= $(if $(wildcard $(VENV)/.installed-gpu),1,0)
ORT_EXTRA := $(if $(filter 1 yes true on,$(GPU)),gpu,cpu)
ORT_OTHER := $(if $(filter gpu,$(ORT_EXTRA)),onnxruntime,onnxruntime-gpu)
FLAVOR_STAMP := $(VENV)/.installed-$(ORT_EXTRA)

# OpenVINO, a second CPU runtime (the [openvino] extra): export measures the shipped files on it and model.json
# recommends it where it is faster; the server and the predictor fall back to onnxruntime without it. In by
# default (docs/speed.md: +59 MB download, +180 MB installed, 1.3-2x faster int8 here); `make install OPENVINO=0`
# leaves it out and removes it. Sticky like GPU.
comma := ,
OPENVINO ?= $(if $(wildcard $(VENV)/.openvino-0),0,1)
OV_ON := $(filter 1 yes true on,$(OPENVINO))
OV_STAMP := $(VENV)/.openvino-$(if $(OV_ON),1,0)
OV_SWITCHED := $(wildcard $(VENV)/.openvino-$(if $(OV_ON),0,1))
EXTRAS := $(ORT_EXTRA),dev$(if $(OV_ON),$(comma)openvino,)

# DDP launcher for the training stages (finetune, compress). export and serve always run once.
ifeq ($(NNODES),1)
TORCHRUN := $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC)
else
TORCHRUN := $(VENV)/bin/torchrun --nnodes=$(NNODES) --nproc_per_node=$(NPROC) --rdzv-backend=c10d \
	--rdzv-endpoint=$(RDZV_ENDPOINT) --rdzv-id=$(RDZV_ID)
endif
DISTRIBUTED := $(if $(filter-out 1,$(NPROC) $(NNODES)),1,)

.PHONY: all install finetune compress export serve test bench gpu-check bento clean-run help

all: finetune compress export

help:
	@sed -n '1,7p' Makefile

# The virtual environment is created and filled on first use (and refreshed when pyproject.toml changes
# or the ONNX Runtime build changes).
# the venv was installed with the other OPENVINO choice: reinstall
.PHONY: openvino-switch
$(FLAVOR_STAMP): pyproject.toml $(if $(OV_SWITCHED),openvino-switch)
	@test -n "$(PYTHON_BOOT)" || { echo "Python 3.10+ is needed (python3.11 recommended)"; exit 1; }
	@$(PYTHON_BOOT) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed, found " + sys.version)'
	@echo "[make] setting up $(VENV) with .[$(EXTRAS)] (first run only; torch is large, this takes a few minutes)"
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@if $(PY) -m pip show -q $(ORT_OTHER) >/dev/null 2>&1; then \
		echo "[make] removing $(ORT_OTHER): it shares its folder with the build GPU=$(GPU) installs"; \
		$(PY) -m pip uninstall -y -q onnxruntime onnxruntime-gpu; fi
	@$(PY) -m pip install -q -e ".[$(EXTRAS)]" 2>&1 | { grep -v "is ignored" || true; }
	@if [ -z "$(OV_ON)" ] && $(PY) -m pip show -q openvino >/dev/null 2>&1; then \
		echo "[make] OPENVINO=0: removing openvino"; $(PY) -m pip uninstall -y -q openvino openvino-telemetry; fi
	@rm -f $(VENV)/.installed-cpu $(VENV)/.installed-gpu $(VENV)/.openvino-*
	@touch $@ $(STAMP) $(OV_STAMP)

install: $(FLAVOR_STAMP)

finetune compress: $(FLAVOR_STAMP)
ifeq ($(DISTRIBUTED),1)
	$(TORCHRUN) -m pipeline $@ --config $(CONFIG) $(ARGS)
else
	$(PY) -m pipeline $@ --config $(CONFIG) $(ARGS)
endif

# One process whatever NPROC says: N copies would race on the same files and time latency under contention.
export: $(FLAVOR_STAMP)
	$(PY) -m pipeline $@ --config $(CONFIG) $(ARGS)

serve: $(FLAVOR_STAMP)
	$(PY) -m pipeline serve --config $(CONFIG) $(ARGS)

# A Bento of the exported model (bentofile.yaml). GPU=1: the same Bento with onnxruntime-gpu (and the CUDA 13
# runtime from PyPI) instead of onnxruntime, and EDGEPIPE_DEVICE=cuda; written from bentofile.yaml so the two
# never drift apart. Run the container with `docker run --gpus all` on a host with NVIDIA driver >= 580.
# EDGEPIPE_DEVICE during the build: the service's `resources` (GPU or not) are recorded in the Bento then.
GPU_BENTOFILE := $(VENV)/bentofile.gpu.yaml
BENTO_GPU_PACKAGES ?= onnxruntime-gpu[cuda,cudnn]>=1.20 nvidia-cublas>=13,<14
bento: $(FLAVOR_STAMP)
	$(PY) -m pipeline serve --config $(CONFIG) $(ARGS) serve.stage_for_bento=true
ifeq ($(ORT_EXTRA),gpu)
	$(PY) -c 'import sys, yaml; b = yaml.safe_load(open("bentofile.yaml")); \
	b["python"]["packages"] = [p for p in b["python"]["packages"] if not p.startswith("onnxruntime")] + sys.argv[2:]; \
	b["envs"] = [e for e in b.get("envs", []) if e["name"] != "EDGEPIPE_DEVICE"] + [{"name": "EDGEPIPE_DEVICE", "value": "cuda"}]; \
	b.setdefault("labels", {})["device"] = "cuda"; \
	yaml.safe_dump(b, open(sys.argv[1], "w"), sort_keys=False)' $(GPU_BENTOFILE) $(foreach p,$(BENTO_GPU_PACKAGES),'$(p)')
	EDGEPIPE_DEVICE=cuda $(VENV)/bin/bentoml build -f $(GPU_BENTOFILE) .
else
	EDGEPIPE_DEVICE=cpu $(VENV)/bin/bentoml build .
endif

test: $(FLAVOR_STAMP)
	$(PY) -m pytest -q tests

bench: $(FLAVOR_STAMP)
	$(PY) benchmarks/finetune_bench.py

# GPU smoke test and speed table (a few minutes; says so and exits 0 on a machine without a GPU)
gpu-check: $(FLAVOR_STAMP)
	$(PY) benchmarks/gpu_check.py

clean-run:
	rm -rf runs/default
