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

# The rest is installed with uv where it can be (77 s with pip, 25-39 s with uv on 2 cores, bytecode
# compiled either way: parallel downloads and unpacking), pinned to the torch just installed; uv reads no pip.conf,
# so where it cannot install (a private index, no uv in the registry) pip does, with its config.
# `make install INSTALLER=pip` skips uv.
INSTALLER ?= uv
TORCH_PIN := $(VENV)/torch-pin.txt

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(TORCH_PIN)
	if [ "$(INSTALLER)" = uv ] && $(PY) -m pip install -q uv \
	    && $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode --constraint $(TORCH_PIN) -e ".[dev]"; then :; \
	else \
	    [ "$(INSTALLER)" != uv ] || echo "uv could not install; installing with pip"; \
	    $(PY) -m pip install -q --constraint $(TORCH_PIN) -e ".[dev]"; \
	fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raydiff train $(ARGS)

# Two test processes (pytest-xdist): the end-to-end tests wait on process start-ups, polls and
# kills for about a quarter of their time, which the other process's tests fill (BENCHMARKS.md,
# "Test suite"). Whole files go to one process (a module's fixtures, a Ray head among them, start
# once), the end-to-end files first (tests/conftest.py). TEST_WORKERS=0 runs all in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
