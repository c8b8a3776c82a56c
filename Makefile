# The two commands of the README: `make demo` and `make test`. Both create/update .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fbmem-installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv browser lint-imports test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The report test renders the HTML report in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: install Debian's chromium (apt-get install chromium) for the report test"; fi; }

# Architecture contracts first (.importlinter): storage <- pipelines <- jobs, a pure jobs.core.
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

test: $(STAMP) browser lint-imports
	$(PY) -m pytest -q --timeout=1800

test-fast: $(STAMP) lint-imports
	$(PY) -m pytest -q -m "not slow" --timeout=600

demo: $(STAMP)
	$(VENV)/bin/fbmem demo --out fbmem-demo

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/score.py
	$(PY) bench/retrieval.py
	$(PY) bench/toy_train.py

clean:
	rm -rf fbmem-demo .pytest_cache
