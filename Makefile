# Two commands for a fresh machine:  `make demo` (set up, then train the default model)
# and `make test` (set up, then run the whole test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench clean

$(VENV)/.plait-installed: pyproject.toml scripts/setup.sh scripts/torch_install.py
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.plait-installed

demo: setup
	$(VENV)/bin/plait train
	$(VENV)/bin/plait report runs/default

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) bench/loop_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
