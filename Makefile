# Two commands on a fresh machine: `make demo` and `make test` (README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-service test-all bench bench-motion bench-sorting bench-calcium train-calcium clean

install: $(STAMP)

# torch first, from the pinned release, so that no second multi-GB build is pulled;
# then the package with its test + validation extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/nwbflow demo

# ruff on src/, then the tests and the docstring examples (pyproject: testpaths, --doctest-modules).
test: install
	$(BIN)/ruff check src
	$(BIN)/python -m pytest -m "not slow and not gpu"

# A worker killed mid-run: its run Crashed from missing heartbeats (90 s) and resumed on another worker,
# about 3 min; marked slow, so CI (.ci/run) runs it as its own step after `make test`.
test-service: install
	$(BIN)/python -m pytest -m slow tests/test_worker_loss.py

test-all: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python benchmarks/preprocess.py --duration-s 60 --long-duration-s 600 --threads 1 2
	$(BIN)/python benchmarks/pipeline.py

# MEDiCINe: ours vs the reference package (medicine-neuro) vs DREDge, same peaks (~30 min on 2 cores).
bench-motion: install
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python benchmarks/motion.py

# Spike sorting: ours vs spykingcircus2 / tridesclous2 (hdbscan, from the bench extra), static and drifting truth.
bench-sorting: install
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python benchmarks/sorting.py

# Calcium spike inference: leave-one-dataset-out accuracy + CPU throughput (~30 min on 2 cores). GT_DIR holds
# GT_autocalibration/ of github.com/PTRRupprecht/Autocalibrated-spike-inference (benchmarks/RESULTS.md).
GT_DIR ?= data/calcium_gt
bench-calcium: install
	$(BIN)/python benchmarks/calcium.py --data-dir $(GT_DIR)

# Retrain the shipped calcium network (src/nwbflow/ophys/weights/nwbflow-cnn-v3.*), ~7 min on 2 cores.
train-calcium: install
	$(BIN)/nwbflow train-calcium $(GT_DIR) --steps 16000 --seed 0

clean:
	rm -rf $(VENV) nwbflow-demo .pytest_cache
