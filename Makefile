# `make run` and `make test` each do all set-up on a fresh machine (virtual environment, installs,
# build of qjl_kernel) and then run the main job or the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py pyproject.toml $(wildcard qjl_kernel/csrc/*.cpp qjl_kernel/csrc/*.cu qjl_kernel/csrc/*.h qjl_kernel/csrc/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

run: setup
	$(PY) longbench.py

test: setup
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf build *.egg-info qjl_kernel/*.so
