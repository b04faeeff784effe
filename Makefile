# Two commands for a fresh machine: `make demo` (set up + main job) and `make test` (set up + tests).
# The virtual environment sees the system's packages, so a machine that already has a (CUDA) torch keeps
# it; on a CPU-only machine without torch, the CPU wheel is installed (an unpinned torch pulls CUDA).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dit_fast_installed
TORCH_CPU := torch==2.13.0
DEEPSPEED := deepspeed==0.19.8

.PHONY: setup demo test bench table gpu-check clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q "setuptools>=70" wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	# DeepSpeed ships as source: build it against the torch above (an isolated build would fetch another torch).
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation $(DEEPSPEED)
	$(PY) -m pip install -q --no-build-isolation -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m dit_fast.demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pytest -q benchmarks

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
