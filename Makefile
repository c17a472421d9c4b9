# `make test` and `make demo` each set up everything from nothing (a virtualenv in .venv) and are
# fast when it already exists: the install step re-runs only when setup.py changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed JIT-compiles ops into this folder; keep it per virtualenv (another virtualenv's include paths
# invalidate the cache and every op is built again).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: test test-quick demo bench gpu-check gpu-wheels venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	$(PY) -m pip install --quiet -e ".[test,hf,onnx]"
	touch $(STAMP)

# Two pytest workers (pytest-xdist; one torch thread each, tests/conftest.py), a test file per worker at a time
# (its module fixtures built once): 12-13 minutes on the 2-core machine (docs/development.md).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The unit tests alone (under a minute): everything but the end-to-end runs marked `slow`.
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# The whole job on the built-in corpus (a few minutes on 2 CPU cores); results in demo_out/.
demo: $(STAMP)
	$(PY) finetune/demo.py --out demo_out

# Benchmarks (minutes; numbers go into bench/README.md).
bench: $(STAMP)
	$(PY) -m bench.data_throughput
	$(PY) -m bench.train_throughput
	$(PY) -m bench.schedules
	$(PY) -m bench.shar_ranks

# Every GPU-only check and measurement (a machine with a CUDA GPU; a few minutes): bench/results/<gpu>.md.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check

# Wheels for a GPU machine without a package index (CPython 3.12): see bench/gpu_wheels.sh.
gpu-wheels: $(STAMP)
	PYTHON=$(PY) bench/gpu_wheels.sh .whl

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo_out
