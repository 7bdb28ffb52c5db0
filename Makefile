# Two entry points: `make quickstart` (the main job) and `make test`. Each sets up .venv first, with exactly the
# versions in constraints.txt (the set the suite last passed on). `make test-latest` runs the suite on the newest
# releases pyproject.toml allows, in .venv-latest; `make constraints` then records that set as the new pins.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch by default; on a CUDA machine: make TORCH=torch quickstart (if that torch build pins another
# triton than constraints.txt, add CONSTRAINTS=/dev/null)
TORCH  ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
RECIPE ?= recipes/quickstart.yaml
LATEST ?= .venv-latest

.PHONY: setup quickstart test test-latest constraints gpu-check clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(PY) -m convert run $(RECIPE)

test: $(VENV)/.installed
	$(PY) -m pytest tests

# a fresh venv with the newest releases pyproject.toml allows (no constraints), then the whole suite
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet "$(TORCH)"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	grep -iE '^(transformers|kernels|accelerate|peft|datasets|lm.eval|triton|huggingface.hub)==' $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest tests

# after `make test-latest` passed: its versions become constraints.txt (torch stays with $(TORCH))
constraints: $(LATEST)/versions.txt
	{ sed -n '1,3p' constraints.txt | sed "s/, Python 3[^,]*, [0-9-]*)/, $$($(LATEST)/bin/python -c 'import platform; print("Python", platform.python_version())'), $$(date +%F))/"; \
	  grep -viE '^(torch|nvidia-|cuda-)' $(LATEST)/versions.txt; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# on a CUDA machine (make TORCH=torch gpu-check): compiled kernels, a bf16 two-stage run, the kernel benchmark
gpu-check: $(VENV)/.installed
	$(PY) eval/gpu_check.py

clean:
	rm -rf $(VENV) $(LATEST) outputs
