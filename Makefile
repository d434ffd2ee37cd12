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

# pip byte-compiles every file it installs, one at a time: about 45 s of a 75 s install here, most of
# it on transformers' model zoo, diffusers' pipelines and the packages' own tests, which spoxl does
# not import. So pip installs without compiling and compileall then compiles the rest on every core
# (a module left out still imports, from source, a little slower). The pattern is matched below
# site-packages only; py312_intrinsics is torch's one file in Python 3.12 syntax (pip skips it too).
NOT_IMPORTED := site-packages/(transformers/models/(?!auto/|clip/|blip/|bert/)[a-z0-9_]+/|diffusers/pipelines/(?!stable_diffusion_xl/|stable_diffusion/)[a-z0-9_]+/|.*/tests?/|.*/py312_intrinsics\.py)
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-compile

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on the dev/CI machines (a GPU cluster installs its CUDA build).
	$(PIP) torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) -r requirements.txt -r requirements-dev.txt
	$(PIP) --no-deps --no-build-isolation -e .
	$(PY) -m compileall -q -j 0 -x '$(NOT_IMPORTED)' "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
	  || echo "make: some installed files did not byte-compile (listed above); they import from source"
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
