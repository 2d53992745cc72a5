# Two commands do all the set-up: `make demo` and `make test` each create .venv first if it is missing (`make docs`
# too).
PY      ?= python3
# The torch requirement, installed first; override it for another build, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"   (the CPU wheel from PyTorch)
#   make test TORCH="torch==2.13.0+cu126 --index-url https://download.pytorch.org/whl/cu126"
TORCH   ?= torch==2.13.0
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv demo readme test test-fast docs lint bench clean

venv: $(STAMP)

# torch first, as $(TORCH) says: pip resolves a plain "torch==2.13.0" to whatever build its index serves for this
# platform (on a stock x86 Linux machine with PyPI, a CUDA build of a few GB; here a CPU wheel from local disk).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,docs]"
	touch $(STAMP)

# The main job: the quick Dino study (objectives x samplers, MMD, Picard iterations, likelihood, figures).
demo: $(STAMP)
	$(BIN)/difflab study dino --quick --out runs/demo
	@echo "report: runs/demo/report.md (figures and results.json beside it)"

# Regenerate the quick-study block of docs/results.md and its figure: the quick study over 3 seeds at one thread,
# and seed 0 of its sequential rows at two threads (the spread a fresh run may land in; about an hour on two cores).
readme: $(STAMP)
	$(BIN)/difflab study dino --quick --seeds 3 --threads 1 --out runs/readme
	$(BIN)/difflab study dino --quick --threads 2 --samplers ddpm,ddim,heun --out runs/readme-threads
	$(BIN)/python scripts/readme_results.py runs/readme runs/readme-threads

# The whole suite, what CI runs (.ci/run): under 8 minutes on two idle cores.
test: $(STAMP)
	$(BIN)/python -m pytest

# The quick loop while editing (about a minute and a half on two idle cores): every test but those marked slow (over
# a second or two, and the float32 re-runs of the sampler suites) or dist (several processes); `make test` runs all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not dist"

# The documentation site (mkdocs.yml: docs/ with the API reference from the docstrings), built with --strict (a
# broken link, a missing figure or a docstring the reference cannot render fails it) into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/picard_latency.py --run runs/demo/runs/dsm-s0 --batches 1,8,32,128 --windows 1000,250,100

clean:
	rm -rf $(VENV) runs site .pytest_cache
