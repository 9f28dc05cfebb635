# flmm: `make run` trains F-LMM on the embedded synthetic world; `make test` runs the test suite.
# Both create the project virtualenv (.venv) on first use.
PY      ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST  := $(PYTHON) -m pytest

.DEFAULT_GOAL := help
.PHONY: help venv run test test-slow test-real test-all evidence foundation bench bench-cache bench-train bench-gpu clean clean-cache

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv with the pinned torch/torchvision and flmm (editable)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -c constraints.txt torch torchvision
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: venv ## train F-LMM on the synthetic world (run folder under logs/; the world is written to $FLMM_HOME on first use; tiny models ship with flmm)
	$(PYTHON) -m flmm.train

test: venv ## fast test suite (everything not marked slow)
	$(PYTEST) -m "not slow and not gpu and not real_shape" -q

test-slow: venv ## slow tests: the default run, DDP / sharded LMM vs 1 process, resume, sweeps, every family, the notebook
	$(PYTEST) -m "slow and not gpu and not real_shape" -q

test-real: venv ## real-shape tier: every family at its published widths and processor settings
	$(PYTEST) -m "real_shape and not gpu" -q --durations=0

test-all: venv ## every CPU test but the real-shape tier (make test-real)
	$(PYTEST) -m "not gpu and not real_shape" -q

evidence: venv ## the synthetic world's evidence table (pretrained vs random LMM, coarse vs refined)
	$(PYTHON) scripts/synthetic_evidence.py

foundation: venv ## rebuild the shipped tiny LLaVA and tiny SAM from their recipes (CUDA if present; about 95 min on two CPU threads), print the time
	$(PYTHON) -m flmm.foundation

bench: venv ## attention-capture benchmark (time and memory, side by side)
	$(PYTHON) benchmarks/attention_capture.py

bench-cache: venv ## frozen-feature cache: training-step time uncached vs cached, and the losses
	$(PYTHON) benchmarks/feature_cache.py

BENCH_PRESET ?= cpu
bench-train: venv ## whole training steps: reference way vs flmm vs cached vs floor (BENCH_PRESET=cpu|gpu-llava15|gpu-next)
	$(PYTHON) benchmarks/train_throughput.py --preset $(BENCH_PRESET) --json docs/benchmarks/train_throughput_$(BENCH_PRESET).json

bench-gpu: venv ## GPU sizing table (needs CUDA): every family in bf16 / 4-bit / 8-bit, 10 minutes (docs/development/gpu_sizing.md)
	timeout 600 $(PYTHON) benchmarks/gpu_sizing.py --json docs/benchmarks/gpu_sizing.json

clean: ## remove run logs and caches of Python
	rm -rf logs outputs multirun .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# flmm's home (flmm.files.flmm_home): the generated world and the cached foundation models live
# there for every run, wherever it starts; run folders (logs/) stay in the folder a run starts in
FLMM_HOME ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/flmm

clean-cache: ## remove the generated world and the cached (not the shipped) tiny foundation models from $FLMM_HOME
	rm -rf "$(FLMM_HOME)/synthetic_world" "$(FLMM_HOME)/synthetic_world.lock" "$(FLMM_HOME)/foundation"
