# qlora-kfp: Kubeflow Pipelines for QLoRA fine-tuning. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/local
REGISTRY ?= ghcr.io/qlora-kfp
TAG ?= 0.1.0
OVERLAY ?= example
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one a core, at most 4 (each starts its own servers and trains
# its own tiny model for the session fixtures); 1 runs the tests in pytest's own process.
# Whole files go to a worker (tests/conftest.py: a file, or the files sharing a costly session
# fixture), the heaviest first.
TEST_WORKERS ?= $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1); echo $$(( n > 4 ? 4 : n )))
XDIST = $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS))
# The real etcd, kube-apiserver and kube-controller-manager the manifest tests start
# (backend/kube pins the release).
BACKEND_BIN := .cache/backend/bin
# The release go.mod pins, stamped into the binary (its /version; 1.34 -> gitMinor 34).
KUBE_VERSION := $(shell awk '$$1 == "k8s.io/kubernetes" {print $$2}' backend/kube/go.mod)
KUBE_LDFLAGS := $(foreach kv,gitVersion=$(KUBE_VERSION) gitMajor=1 \
  gitMinor=$(word 2,$(subst ., ,$(KUBE_VERSION))) gitTreeState=clean,-X k8s.io/component-base/version.$(kv))
export HF_HUB_OFFLINE ?= 1
export QLORA_KFP_REGISTRY := $(REGISTRY)
export QLORA_KFP_TAG := $(TAG)

help: ## Show this help
	@awk 'BEGIN{FS=":.*## "} /^[a-zA-Z0-9_-]+:.*## /{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	@# setuptools' "Editable installation" note (components/ and pipelines/ install as
	@# qlora_kfp.*, which needs its import finder) is information, not a problem: hidden.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv with the project and its test tools (torch from PyPI: the CUDA build, ~6 GB)

run: $(STAMP) ## Run the pipeline locally (kfp.local; the demo unless PARAMS/ARGS give a model and data)
	$(BIN)/qlora-kfp run --workdir $(WORKDIR) $(if $(PARAMS),--params_file $(PARAMS)) $(ARGS)

generate: $(STAMP) ## Regenerate the component modules and README's parameter and environment tables
	$(BIN)/qlora-kfp generate

compile: generate ## Compile the pipelines to pipelines/compiled/*.yaml (REGISTRY, TAG)
	$(BIN)/qlora-kfp compile --output_dir pipelines/compiled

install-browser: ## Install Debian's chromium for the MLflow UI browser test (root, apt)
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi; }

KFP_RELEASES := .cache/kfp-releases/.done
$(KFP_RELEASES): tests/support/kfp_releases.py | $(STAMP)
	$(BIN)/python tests/support/kfp_releases.py
	touch $@

kfp-releases: $(KFP_RELEASES) ## Download each KFP release's protos (PyPI) for tests/pipelines/test_kfp_releases.py

BACKEND_BINS := $(addprefix $(BACKEND_BIN)/,etcd kube-apiserver kube-controller-manager)
# One grouped target: a single `go build` links all three (one build at a time on 2 cores).
$(BACKEND_BINS) &: $(addprefix backend/kube/,go.mod go.sum tools.go etcd/main.go)
	mkdir -p $(BACKEND_BIN)
	cd backend/kube && go build -trimpath -ldflags "-s -w $(KUBE_LDFLAGS)" -o $(abspath $(BACKEND_BIN))/ \
	  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager ./etcd
	touch $(BACKEND_BINS)

backend: $(BACKEND_BINS) ## Build etcd, kube-apiserver, kube-controller-manager (backend/kube; needs Go) into .cache/backend/bin

# Kubeflow Trainer's controller manager and the JobSet controller manager of the version it requires
# (backend/trainer pins both), and the manifests of the same releases the tests install (CRDs, RBAC,
# webhook configurations, runtimes). VERSION names the Trainer release they came from.
TRAINER_VERSION := $(shell awk '$$1 == "github.com/kubeflow/trainer/v2" {print $$2}' backend/trainer/go.mod)
TRAINER_MANIFESTS := .cache/backend/trainer
TRAINER_OUT := $(addprefix $(BACKEND_BIN)/,trainer-controller-manager jobset-controller-manager) \
  $(TRAINER_MANIFESTS)/VERSION
$(TRAINER_OUT) &: $(addprefix backend/trainer/,go.mod go.sum tools.go)
	mkdir -p $(BACKEND_BIN)
	cd backend/trainer && go build -trimpath -ldflags "-s -w" -o $(abspath $(BACKEND_BIN))/ \
	  github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager
	@# JobSet's main package is its module's root: named, its binary is not just "jobset".
	cd backend/trainer && go build -trimpath -ldflags "-s -w" \
	  -o $(abspath $(BACKEND_BIN))/jobset-controller-manager sigs.k8s.io/jobset
	@# The module cache's files are read-only: the copies are made writable, so the next copy can
	@# remove them.
	rm -rf $(TRAINER_MANIFESTS) && mkdir -p $(TRAINER_MANIFESTS)/jobset
	cd backend/trainer && \
	  cp -R "$$(go list -m -f '{{.Dir}}' github.com/kubeflow/trainer/v2)/manifests/base/." $(abspath $(TRAINER_MANIFESTS))/ && \
	  cp -R "$$(go list -m -f '{{.Dir}}' sigs.k8s.io/jobset)/config/components/." $(abspath $(TRAINER_MANIFESTS))/jobset/
	chmod -R u+w $(TRAINER_MANIFESTS)
	echo $(TRAINER_VERSION) > $(TRAINER_MANIFESTS)/VERSION
	touch $(TRAINER_OUT)

# Training Operator v1's PyTorchJob CRD (train_runner=pytorchjob; tests/training/test_pytorchjob_kube.py
# installs it): the release's own file, from its Go module (no controller is built).
TRAINING_OPERATOR_VERSION := v1.8.1
PYTORCHJOB_CRD := .cache/backend/training-operator/$(TRAINING_OPERATOR_VERSION)/kubeflow.org_pytorchjobs.yaml
$(PYTORCHJOB_CRD):
	mkdir -p $(@D)
	dir=$$(cd / && GO111MODULE=on GOFLAGS=-mod=mod go mod download -json \
	  github.com/kubeflow/training-operator@$(TRAINING_OPERATOR_VERSION) | \
	  $(PYTHON) -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') && \
	  cp "$$dir/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" $@.tmp && chmod u+w $@.tmp && mv $@.tmp $@

backend-trainer: $(TRAINER_OUT) $(PYTORCHJOB_CRD) ## Build Kubeflow Trainer's and JobSet's controller managers (backend/trainer; needs Go) into .cache/backend/bin, their manifests beside, and fetch Training Operator v1.8.1's PyTorchJob CRD

test: $(STAMP) $(KFP_RELEASES) install-browser backend backend-trainer ## Run every test the CPU can run (gpu tests skip)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP) $(KFP_RELEASES) ## Run the tests not marked slow or integration
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not integration" $(PYTEST_ARGS)

lint: $(STAMP) ## Ruff lint and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP) ## Ruff format and autofix
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

GIT_COMMIT = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
images: ## Build and push both images: REGISTRY=... TAG=... (needs docker)
	docker build -f images/Dockerfile.cpu --build-arg GIT_COMMIT=$(GIT_COMMIT) -t $(REGISTRY)/qlora-kfp-cpu:$(TAG) .
	docker push $(REGISTRY)/qlora-kfp-cpu:$(TAG)
	docker build -f images/Dockerfile.gpu --build-arg GIT_COMMIT=$(GIT_COMMIT) -t $(REGISTRY)/qlora-kfp-gpu:$(TAG) .
	docker push $(REGISTRY)/qlora-kfp-gpu:$(TAG)

manifests: ## Render OVERLAY (example, example-istio; example/admin, example/owner: one role's part) with kubectl kustomize
	@kubectl kustomize manifests/overlays/$(OVERLAY)

upload: $(STAMP) ## Upload PACKAGE (default pipelines/compiled/qlora_finetune.yaml) to KFP 2.15+ (new version if it exists)
	$(BIN)/qlora-kfp upload $(if $(PACKAGE),--package $(PACKAGE))

run-remote: $(STAMP) ## Start a KFP run: PARAMS=params.yaml and/or ARGS="--param lora_r=32" (PIPELINE: its name)
	$(BIN)/qlora-kfp run-remote $(if $(PIPELINE),--name $(PIPELINE)) $(if $(PARAMS),--params_file $(PARAMS)) $(ARGS)

schedule: $(STAMP) ## Recurring retraining: ACTION=create|list|pause|resume|delete CRON="0 0 3 * * 1" PARAMS=...
	$(BIN)/qlora-kfp schedule $(or $(ACTION),create) --cron "$(or $(CRON),0 0 3 * * 1)" \
	  $(if $(PIPELINE),--name $(PIPELINE)) $(if $(ID),--id $(ID)) $(if $(PARAMS),--params_file $(PARAMS)) $(ARGS)

device-wheels: ## Fill .whl/ with the wheels a lent GPU machine lacks (bench/device_wheels.sh)
	bash bench/device_wheels.sh

# A target's default arguments live in a variable: written into $(or ...) they were split at
# the first comma of a variant ("bs=8,pack=..."), and bash stopped at the unclosed quote.
BENCH_CHAT_ARGS = --size 8b --data chat --bs 8 --steps 30 --warmup 3 --rows 1600 --variants \
  "auto-80gb-bs8:bs=8,pack=bins,pl=2048,fused=on,opt=auto,gcl=auto,off=auto,gmem=80,steps=33"
bench: ## On a GPU machine: train stage vs the seeds' recipe, chat rows (BENCHMARKS.md; BENCH_ARGS=...)
	bash bench/run_device.sh $(or $(BENCH_ARGS),$(BENCH_CHAT_ARGS))

BENCH_MFU_ARGS = --size 8b --data fixed --bs 2 --steps 47 --warmup 3 --rows 272 --variants \
  "lowmem-bs8:bs=8,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=-1,off=on,steps=33" \
  "auto-80gb-bs6:bs=6,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=auto,off=auto,gmem=80,steps=33" \
  "auto-54gb-bs6:bs=6,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=auto,off=auto,gmem=54,steps=33" \
  "auto-54gb-bs7:bs=7,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=auto,off=auto,gmem=54,steps=33" \
  "lowmem-bs8-drop0.1:bs=8,pack=bins,pl=2048,fused=on,opt=auto,gcl=-1,off=on,steps=33" \
  "same-batches-offload:bs=2,group=0,pack=padding_free,fused=on,opt=auto,gcl=-1,off=on" \
  "auto-80gb-bs8:bs=8,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=auto,off=auto,gmem=80,steps=33" \
  "trl-lowmem-bs8:trainer=trl,bs=8,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=-1,off=on,steps=33" \
  "trl-80gb-bs6:trainer=trl,bs=6,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=0,off=off,steps=33" \
  "lowmem-bs8-bf16:bs=8,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=-1,off=on,steps=33,fp8=off" \
  "auto-80gb-bs6-bf16:bs=6,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=auto,off=auto,gmem=80,steps=33,fp8=off"
# fp8_base is auto (on for Hopper); the -bf16 variants are the same settings with the base's
# products in bf16, as bitsandbytes runs them. The trl- variants: TRL's SFTTrainer (bench/trl_peer.py) as the measured peer of lowmem-bs8
# (every layer checkpointed, offloaded) and of auto-80gb-bs6 (which resolves to no layer
# checkpointed at 80 GB: TRL has no auto, so gcl=0,off=off are explicit).
bench-mfu: ## On a GPU machine: fixed 2,048-token rows: MFU with auto at 80 GB, speed at <= 11 GiB
	bash bench/run_device.sh $(or $(BENCH_ARGS),$(BENCH_MFU_ARGS))

BENCH_70B_ARGS = --steps 33 --warmup 3 --variants \
  "auto-48gb:bs=1,pack=bins,pl=2048,fused=on,r=16,alpha=32,drop=0.05,gmem=48" \
  "auto-48gb-bs2:bs=2,pack=bins,pl=2048,fused=on,r=16,alpha=32,drop=0.05,gmem=48"
bench-70b: ## On a GPU machine: Llama-3.1-70B shapes, r=16, 2,048-token rows (1 and 2 a step), auto for a 48 GB GPU, then the evaluate stage
	BENCH=bench_70b.py bash bench/run_device.sh $(or $(BENCH_ARGS),$(BENCH_70B_ARGS))

# 6 bins a GPU, no layer checkpointed (64 GiB on one GPU, BENCHMARKS.md), 33 steady steps per process count.
MULTI_GPU_ARGS = --size 8b --data fixed --bs 6 --steps 33 --warmup 3 --rows 432 --skip-baseline \
  --nproc $(or $(NPROC),1 2) --variants \
  "ddp-6bins:bs=6,pack=bins,pl=2048,fused=on,opt=auto,drop=0,gcl=0,off=off,gmem=80,steps=36"
bench-multi-gpu: ## On a GPU machine: train stage on NPROC="1 2" GPUs side by side (DDP, same per-GPU batch), 8B, 2,048-token rows
	bash bench/run_device.sh $(or $(BENCH_ARGS),$(MULTI_GPU_ARGS))

BENCH_MERGE_ARGS = --size 8b --memory-gib 20
bench-merge: ## On a GPU machine: the merge stage on a random 8B bf16 checkpoint (shard by shard, then the logit check)
	BENCH=merge_bench.py bash bench/run_device.sh $(or $(BENCH_ARGS),$(BENCH_MERGE_ARGS))

bench-stages: ## On a GPU machine: every stage once on 1B shapes, wall time + peak memory
	bash bench/run_gpu_stages.sh $(BENCH_ARGS)

bench-pipeline: ## On a GPU machine: the whole pipeline through kfp.local on 1B shapes
	bash bench/run_pipeline_gpu.sh $(BENCH_ARGS)

mlflow-ui: $(STAMP) ## Open the MLflow UI on the local run's store (http://127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(WORKDIR))/mlflow.db \
	  --host 127.0.0.1 --port 5000

clean: ## Remove local runs and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache

.PHONY: help install run generate compile backend backend-trainer test test-fast kfp-releases lint format mlflow-ui clean upload run-remote \
	schedule images manifests install-browser bench bench-mfu bench-70b bench-merge bench-multi-gpu bench-stages bench-pipeline \
	device-wheels
