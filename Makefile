# Two entry points: `make quickstart` (the main job) and `make test`. Each sets up .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch by default; on a CUDA machine: make TORCH=torch quickstart
TORCH  ?= torch==2.13.0
RECIPE ?= recipes/quickstart.yaml

.PHONY: setup quickstart test clean

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

clean:
	rm -rf $(VENV) outputs
