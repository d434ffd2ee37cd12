# Two commands set everything up on a fresh machine: `make test` and `make demo`.
# Both create .venv if missing and (re)install only when requirements or setup.py changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The C++ ops DeepSpeed JIT-builds on first init live inside the venv: built once, not per test.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on the dev/CI machines (a GPU cluster installs its CUDA build).
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Two pytest-xdist workers, a test module per unit, in the order tests/conftest.py sets: in-process
# tests run one thread each and the multi-rank modules take turns (a lock in tests/conftest.py),
# so the pair of cores is busy without being oversubscribed.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

demo: venv
	bash launch/demo.sh

bench: venv
	$(PY) benchmarks/kernels.py

clean:
	rm -rf $(VENV) runs/demo
