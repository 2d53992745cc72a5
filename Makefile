# Two commands do all the set-up: `make demo` and `make test` each create .venv first if it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

# torch is pinned to the CPU wheel first so that pip never resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/difflab train --data dino --objective dsm --seed 0 --out runs/demo-dsm --overwrite
	$(BIN)/difflab sample runs/demo-dsm --sampler ddpm --steps 1000 --n 2000 --seed 0 --out runs/demo-dsm/samples.npz
	$(BIN)/difflab eval runs/demo-dsm/samples.npz --data dino --metric mmd --plot runs/demo-dsm/samples.png

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
