# The two commands of the README: `make demo` and `make test`. Both create/update .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fbmem-installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=1800

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --timeout=600

demo: $(STAMP)
	$(VENV)/bin/fbmem demo --out fbmem-demo

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/score.py
	$(PY) bench/retrieval.py

clean:
	rm -rf fbmem-demo .pytest_cache
