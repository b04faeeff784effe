# Two commands for a fresh machine: `make demo` (set up + main job) and `make test` (set up + tests).
# The virtual environment sees the system's packages, so a machine that already has a torch keeps it.
# Without one: a GPU machine (nvidia-smi lists a GPU) gets the default (CUDA) build from the configured
# index; a CPU-only machine gets a CPU build -- from the configured index when that already serves one
# (a "+cpu" version, or no nvidia-* dependencies), else from PyTorch's CPU wheel index, because
# PyPI's Linux torch pulls several GB of CUDA libraries. Only that last case contacts download.pytorch.org.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dit_fast_installed
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
DEEPSPEED := deepspeed==0.19.8
# Reads `pip install --dry-run --report -` on stdin; exit 0 when the torch it would install is a CPU build.
IS_CPU_BUILD := import json, sys; found = json.load(sys.stdin)["install"]; meta = found[0]["metadata"] if found else {}; \
	cuda = [r for r in meta.get("requires_dist", []) if r.lower().startswith("nvidia")]; \
	sys.exit(0 if found and ("+cpu" in meta["version"] or not cuda) else 1)

.PHONY: setup demo test bench table gpu-check clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q "setuptools>=70" wheel
	@if $(PY) -c "import torch" 2>/dev/null; then echo "keeping the installed torch"; \
	elif nvidia-smi -L >/dev/null 2>&1; then echo "GPU machine: $(TORCH) from the configured index"; \
		$(PY) -m pip install -q $(TORCH); \
	elif $(PY) -m pip install -q --dry-run --ignore-installed --no-deps --report - $(TORCH) 2>/dev/null \
			| $(PY) -c '$(IS_CPU_BUILD)'; then echo "CPU machine: the configured index serves a CPU $(TORCH)"; \
		$(PY) -m pip install -q $(TORCH); \
	else echo "CPU machine: $(TORCH) from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install -q --index-url $(TORCH_CPU_INDEX) $(TORCH); fi
	# DeepSpeed ships as source: build it against the torch above (an isolated build would fetch another torch).
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation $(DEEPSPEED)
	$(PY) -m pip install -q --no-build-isolation -e ".[all]"
	@# torch-fidelity's Inception, only for tests/test_evaluation_inception.py to compare ours with: in a
	@# private folder (its wheel also installs a top-level `tests` package that would shadow ours) and
	@# without dependencies (it requires torchvision, which cannot load beside a CPU torch here)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/torch-fidelity torch-fidelity==0.4.0
	touch $(STAMP)

setup: $(STAMP)

# `make demo OBJECTIVE=flow`: the same demo trained with SiT's flow matching, in results/demo-flow.
OBJECTIVE ?= diffusion
demo: setup
	$(PY) -m dit_fast.demo --objective $(OBJECTIVE) --out results/demo$(if $(filter flow,$(OBJECTIVE)),-flow,)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pytest -q benchmarks

table: setup
	$(PY) benchmarks/table.py

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
