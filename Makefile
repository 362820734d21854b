# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, train on the built-in dataset (local Ray, 2 workers)
#   make test   - create .venv, install with test extras, run the test suite
#
# torch is installed first, pinned, so that pip keeps it: on a CPU-only machine that ships the
# torch==2.13.0 CPU wheel locally this takes seconds; on a GPU machine the same spec resolves
# to PyPI's CUDA build. Override with e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raydiff-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raydiff train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
