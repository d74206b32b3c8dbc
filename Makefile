# Each target sets up its own virtual environment (.venv) on first use.
# torch is pinned first so pip takes the CPU build instead of a multi-GB CUDA one.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
comma := ,

.PHONY: setup demo test test-fast bench mutate clean

$(BIN)/normfree: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/normfree

demo: setup
	$(BIN)/normfree study --out runs/study

test: setup
	$(BIN)/python -m pytest -q tests

# the fast loop: everything but the tests marked slow (distributed, benchmarks, depth 1000)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# mutation testing (not part of CI; ~70 min on 2 idle cores, two mutants at a time): a score per module, see tests/README.md.
# MODULES=agc,layers limits it to some modules.
MUTMUT ?= mutmut==3.8.1
mutate: setup
	$(BIN)/pip install -q $(MUTMUT)
	nice -n 15 $(BIN)/python tests/mutate.py --max-children 2 $(subst $(comma), ,$(MODULES))

bench: setup
	$(BIN)/python benchmarks/bench_methods.py

clean:
	rm -rf $(VENV) runs
