# The two commands of the README:
#   make demo   set up the environment if needed, then answer a question about a video
#   make test   set up the environment if needed, then run the test suite
# Set-up: a virtualenv in .venv, torch first (2.13.0, CPU build here), the rest, then the
# C++ extension stllm_engine._C built in place with ninja (no build isolation, so the
# extension is compiled against the torch that is installed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.stllm-installed
VIDEO ?=
QUESTION ?=

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(STAMP): $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(PY) -m stllm_engine.cli answer $(if $(VIDEO),--video "$(VIDEO)") $(if $(QUESTION),--question "$(QUESTION)")

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/kernels.py --quick

clean:
	rm -rf build *.egg-info stllm_engine/_C*.so
