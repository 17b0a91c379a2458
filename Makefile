# Two commands do everything on a fresh machine (Python 3.11):
#   make repro   create .venv if missing, install, sync registry.yaml with the method registry,
#                run the whole DVC pipeline on the embedded default
#   make test    create .venv if missing, install (and Debian's postgresql for the sweep storage
#                tests where it is missing), run the test suite
# A second run reuses .venv; it reinstalls only when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# Keep every tool's state inside the project and off the network.
export PATH := $(BIN):$(PATH)
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/site-cache
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export WANDB_DIR := $(CURDIR)
export WANDB_CACHE_DIR := $(CURDIR)/.wandb-state/cache
export WANDB_DATA_DIR := $(CURDIR)/.wandb-state/data
export WANDB_CONFIG_DIR := $(CURDIR)/.wandb-state/config

.PHONY: install repro test test-fast bench gpu-check report clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet --no-compile -e '.[dev]'
	@# pip byte-compiles one file at a time (~50 s on 2 cores); compileall uses every core (~30 s). Like
	@# pip, it leaves a file that does not compile (a package's test data) to be read from source.
	$(VENV)/bin/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	@touch $(STAMP)

repro: $(STAMP)
	$(VENV)/bin/python -m pipeline sync
	dvc repro

test: $(STAMP)
	bash tests/ensure_postgres.sh
	$(VENV)/bin/python -m pytest

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

# Any machine: images/s of the engine's training step per method, beside its aten ops and host syncs per step.
bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.throughput

# On a machine with one CUDA GPU, under 8 minutes: CUDA-only tests, bf16/channels_last/compile loss
# equivalence for every method, a throughput table, host syncs (target 0) and kernel launches per step,
# cold-cache compile time, and a CIFAR-100-sized KD epoch against its compute floor (target <= 1.15) and
# projected to the 240-epoch run (target < 15 min), with GPU memory/utilisation.
gpu-check: $(STAMP)
	$(VENV)/bin/python -m benchmarks.gpu_check

clean-runs:
	rm -rf runs checkpoints reports sweep-results studies dvclive
