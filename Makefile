# `make test` and `make train` create .venv on first use (python3 -m venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
TRAIN_CONFIG ?= configs/default.py
WORKDIR ?= runs/default
PYTEST_ARGS ?= -n 2  # pytest-xdist: two workers (the suite is compile-bound, one core each)

.PHONY: test train bench venv clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

train: $(STAMP)
	$(PY) -m terraflax.train --config=$(TRAIN_CONFIG) --workdir=$(WORKDIR)

bench: $(STAMP)
	$(PY) benchmarks/repeat_compile.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
