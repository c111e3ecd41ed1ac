# Two-tower retrieval with NVIDIA Merlin, served by a real Triton Inference Server.
# Every target creates .venv when it is missing. Paths are explicit; outputs are git-ignored.

SHELL := /bin/bash
PYTHON_SYS ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The Merlin 23.08 container's stack on CPU (Python 3.10, tritonserver 2.36, FAISS 1.7.2): make test-compat.
# pyenv's own 3.10 first: its shim on PATH answers "command not found" unless 3.10 is the selected version.
PYTHON310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) $(shell command -v python3.10 2>/dev/null))
COMPAT_VENV := .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed

BUILD ?= build
WORK ?= $(BUILD)/work
ARTIFACTS ?= $(BUILD)/artifacts
REPOSITORY ?= model_repository
CONFIG ?=
CONFIG_FLAG := $(if $(CONFIG),--config $(CONFIG),)
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=
MODEL_CONTROL ?= none
BENCH_ITEMS ?= 1000000
BENCH_FLAGS ?=
# The stock Merlin reference cannot feed a history input: the benchmark serves an export without one.
BENCH_ARTIFACTS ?= $(BUILD)/bench-artifacts
BENCH_WORK ?= $(BUILD)/bench-work
SOAK_DURATION_S ?= 600
SOAK_CONCURRENCY ?= 16
HEALTH_PORT ?= 8003

export PYTHONPATH := $(CURDIR)
export PYTHONUNBUFFERED := 1

.PHONY: help venv train tune eval fetch-movielens ensemble serve health deploy rollback client demo soak chaos gpu-image-resolve bench bench-seed test test-compat test-unit test-integration clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): requirements.txt constraints.txt
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check pip==23.2.1
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(PY) -m pip check
	@touch $(STAMP)

$(COMPAT_STAMP): requirements-compat.txt requirements-compat-nodeps.txt
	@$(PYTHON310) -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null || { echo "no working Python 3.10 ($(PYTHON310)); set PYTHON310=/path/to/python3.10"; exit 1; }
	rm -rf $(COMPAT_VENV)
	$(PYTHON310) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check pip==23.2.1
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-compat.txt
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-compat-nodeps.txt
	@touch $(COMPAT_STAMP)

venv: $(STAMP) ## create .venv from the pinned requirements (Python 3.11)

train: $(STAMP) ## data -> ETL -> training -> evaluation -> export into $(ARTIFACTS)
	$(PY) -m train run --work $(WORK) --out $(ARTIFACTS) --overwrite $(CONFIG_FLAG)

TUNE_TRIALS ?= 8
tune: $(STAMP) ## bounded search on the tuning users (TUNE_TRIALS=8) -> $(BUILD)/tune/chosen.yaml (then make train CONFIG=that)
	$(PY) -m train tune --work $(BUILD)/tune/work --out $(BUILD)/tune/chosen.yaml --trials $(TUNE_TRIALS) $(CONFIG_FLAG)

eval: $(STAMP) ## full-catalogue evaluation of $(ARTIFACTS) against random, popular, ALS (and the oracle)
	$(PY) -m train evaluate --work $(WORK) --artifacts $(ARTIFACTS)

fetch-movielens: $(STAMP) ## MovieLens-100k as declared-dataset files in $(BUILD)/datasets/ml-100k (configs/movielens-100k.yaml)
	$(PY) -m train fetch-movielens --out $(BUILD)/datasets/ml-100k

ensemble: $(STAMP) ## build the Triton model repository $(REPOSITORY) from $(ARTIFACTS)
	$(PY) -m ensemble build --artifacts $(ARTIFACTS) --repository $(REPOSITORY) --overwrite $(CONFIG_FLAG)

serve: $(STAMP) ## run tritonserver on $(REPOSITORY) supervised, in the foreground; readiness at :$(HEALTH_PORT)/ready (Ctrl-C stops it)
	$(PY) -m ensemble serve --repository $(REPOSITORY) --host $(HOST) --model-control $(MODEL_CONTROL) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --health-port $(HEALTH_PORT) $(CONFIG_FLAG)

health: $(STAMP) ## one canary request through the served model (exit 0: it answers)
	$(PY) -m ensemble health --url $(HOST):$(HTTP_PORT) --repository $(REPOSITORY)

deploy: $(STAMP) ## add $(ARTIFACTS) as the next version of $(REPOSITORY) and switch a running server (MODEL_CONTROL=explicit) to it
	$(PY) -m ensemble deploy --repository $(REPOSITORY) --artifacts $(ARTIFACTS) --url $(HOST):$(GRPC_PORT)

rollback: $(STAMP) ## switch the running server back to the previous version
	$(PY) -m ensemble rollback --repository $(REPOSITORY) --url $(HOST):$(GRPC_PORT)

client: $(STAMP) ## ask a running server for a few users (USERS="11 42 7")
	$(PY) -m client --url $(HOST):$(GRPC_PORT) --user-id $(or $(USERS),11 42 7) --top-k 10 --json

demo: $(STAMP) ## the whole job end to end: train, build, serve, ask over gRPC and HTTP, stop
	$(MAKE) --no-print-directory train ensemble
	$(PY) -m client.demo --repository $(REPOSITORY) --artifacts $(ARTIFACTS) --host $(HOST) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --log $(BUILD)/tritonserver-demo.log

soak: $(STAMP) ## bounded mixed good/bad load on a fresh server (SOAK_DURATION_S=600, SOAK_CONCURRENCY=16)
	$(PY) -m client.soak --repository $(REPOSITORY) --artifacts $(ARTIFACTS) --out $(BUILD)/soak \
		--duration-s $(SOAK_DURATION_S) --concurrency $(SOAK_CONCURRENCY) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

chaos: $(STAMP) ## faults under load on a supervised server (kills, Redis out, bad deploys, hostile requests) -> $(BUILD)/chaos
	@test -f $(REPOSITORY)/retrieval/config.pbtxt || $(MAKE) --no-print-directory train ensemble
	$(PY) -m client.chaos --repository $(REPOSITORY) --artifacts $(ARTIFACTS) --out $(BUILD)/chaos

gpu-image-resolve: ## pip --dry-run of docker/Dockerfile.gpu's requirement set (faiss-gpu-cu12) in a scratch venv: does it resolve?
	rm -rf $(BUILD)/gpu-resolve && $(PYTHON_SYS) -m venv $(BUILD)/gpu-resolve
	$(BUILD)/gpu-resolve/bin/python -m pip install --quiet --disable-pip-version-check pip==23.2.1
	set -o pipefail; $(BUILD)/gpu-resolve/bin/python -m pip install --disable-pip-version-check --dry-run --ignore-installed -r requirements-gpu.txt -c constraints.txt | tail -1 | fold -w 160
	rm -rf $(BUILD)/gpu-resolve

SEED_ARTIFACTS ?= $(BUILD)/scale/artifacts
bench-seed: $(STAMP) ## serving at the seed's size on its trained catalogue, embedded and Redis -> $(BUILD)/scale/serving
	$(PY) -m bench.seed_size --artifacts $(SEED_ARTIFACTS) --out $(BUILD)/scale/serving --tools .tools/perf_analyzer

bench: $(STAMP) ## serving benchmark at BENCH_ITEMS items (above 1M, ours at 1M too): ours vs the Merlin reference (stock; given our index; and batching) vs Triton's floor, ratio targets -> $(BUILD)/bench
	@test -f $(BENCH_ARTIFACTS)/manifest.json || $(PY) -m train run --work $(BENCH_WORK) --out $(BENCH_ARTIFACTS) --overwrite \
		$(CONFIG_FLAG) --set train.history_length=0
	$(PY) -m bench --artifacts $(BENCH_ARTIFACTS) --work $(BENCH_WORK) --out $(BUILD)/bench --items $(BENCH_ITEMS) --tools .tools/perf_analyzer $(BENCH_FLAGS)

test: $(STAMP) ## unit and integration tests (starts the real tritonserver on free ports)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-compat: $(STAMP) $(COMPAT_STAMP) ## the repository .venv exports, served on the Merlin 23.08 container's stack (builds .venv-compat once)
	COMPAT_PYTHON=$(CURDIR)/$(COMPAT_VENV)/bin/python $(PY) -m pytest tests/compat -m compat $(PYTEST_ARGS)

test-unit: $(STAMP) ## unit tests only (no server)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP) ## integration tests only
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

clean: ## remove generated data, artifacts and the model repository (keeps .venv)
	rm -rf $(BUILD) $(REPOSITORY)
