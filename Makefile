# `make test` and `make demo` each set up everything from nothing (a virtualenv in .venv) and are
# fast when it already exists: the install step re-runs only when setup.py changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed JIT-compiles ops into this folder; keep it per virtualenv (reference/ecosystem.md A3).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Until the pretraining and fine-tuning pipelines exist, the demo shows the core: token grids and FLOPs
# per compression method, and one generated clip through fbank -> compression -> encoder.
demo: $(STAMP)
	$(PY) -m common.flops --size base --factors 2,4 --pipeline

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
