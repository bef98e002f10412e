# Two commands: `make demo` and `make test`. Each creates .venv and installs the project if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-slow test-examples test-all bench clean cli-docs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/eosbranch demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,ray,slurm]"   # the sweep's Ray and submitit executors are tested here
	$(PY) -m pytest -q -m slow

test-examples: $(STAMP)   # every example of examples/ at reduced size, with its robust claims (~1 min on 2 idle cores)
	$(PY) -m pytest -q -m "examples or not slow" tests/test_examples.py

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/curvature.py
	$(PY) benchmarks/probes.py
	$(PY) benchmarks/measurement.py --cache runs/bench-cache

cli-docs: $(STAMP)
	$(PY) -c "from eosbranch.cli import write_reference; write_reference('cli')"

clean:
	rm -rf runs .pytest_cache build *.egg-info
