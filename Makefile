# Two commands do all the set-up: `make demo` and `make test` each create .venv first if it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv demo readme test lint bench clean

venv: $(STAMP)

# torch is pinned to the CPU wheel first so that pip never resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: the quick Dino study (objectives x samplers, MMD, Picard iterations, likelihood, figures).
demo: $(STAMP)
	$(BIN)/difflab study dino --quick --out runs/demo
	@echo "report: runs/demo/report.md (figures and results.json beside it)"

# Regenerate the README's quick-study table and figure from runs/demo.
readme: demo
	$(BIN)/python scripts/readme_results.py runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/picard_latency.py --run runs/demo/runs/dsm-s0 --batches 1,8,32,128 --windows 1000,250,100

clean:
	rm -rf $(VENV) runs .pytest_cache
