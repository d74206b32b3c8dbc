# Each target sets up its own virtual environment (.venv) on first use.
# torch is pinned first so pip takes the CPU build instead of a multi-GB CUDA one.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

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

bench: setup
	$(BIN)/python benchmarks/bench_methods.py

clean:
	rm -rf $(VENV) runs
