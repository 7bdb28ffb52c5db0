# Two entry points: `make quickstart` (the main job) and `make test`. Each sets up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch by default; on a CUDA machine: make TORCH=torch quickstart
TORCH  ?= torch==2.13.0
RECIPE ?= recipes/quickstart.yaml

.PHONY: setup quickstart test gpu-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(PY) -m convert run $(RECIPE)

test: $(VENV)/.installed
	$(PY) -m pytest tests

# on a CUDA machine (make TORCH=torch gpu-check): compiled kernels, a bf16 two-stage run, the kernel benchmark
gpu-check: $(VENV)/.installed
	$(PY) eval/gpu_check.py

clean:
	rm -rf $(VENV) outputs
