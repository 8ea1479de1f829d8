# Two commands on a fresh machine: `make demo` and `make test`.  Each creates
# .venv and installs what it needs (the package, tensorflow-cpu, test tools).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench,demo]" tensorflow-cpu
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -u examples/medical_3d/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -u benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
