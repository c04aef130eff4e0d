# normgrowth: every target sets up its own environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Override to install another torch build, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..." for CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test figures bench clean help

help:
	@echo "make test     set up .venv and run the test suite (offline)"
	@echo "make figures  set up, build the offline model pair, collect results, draw figures/"
	@echo "make bench    benchmark collection against plain forward passes (QUICK=1 for a short run)"
	@echo "make clean    remove generated output"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/bench.py $(if $(QUICK),--quick,)

clean:
	rm -rf figures/*.png figures/*.pdf results/ .pytest_cache
