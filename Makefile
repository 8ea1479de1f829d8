# Commands on a fresh machine: `make demo`, `make test`, `make bench`.  Each
# creates .venv and installs what it needs, and only that; a stamp per set of
# packages lets a later target just add its own (`make bench` after `make test`
# adds the bench extra to the same .venv).
#
#   make demo        .[demo] + tensorflow-cpu, then the medical 3D demo
#   make test        + .[test]; the whole suite but the `bench` test on .venv,
#                    then `pytest -m "$(OTHER_PYTHONS_MARKS)"` on each of
#                    OTHER_PYTHONS, each in its own .venv-3.X holding only
#                    .[test] (tests/other_pythons.sh): the oldest and the
#                    newest supported; `make test OTHER_PYTHONS="3.10 3.12 3.13"`
#                    adds 3.12 (about 2 minutes more on the 2-core machine)
#   make bench       + .[bench,ray]; the benchmark (its section (k) runs Ray in a
#                    network namespace with loopback alone, as test-ray does)
#   make test-bench  the `bench` test (the benchmark's tiny mode)
#   make test-ecosystem  ecosystem_tests/ (MONAI, TorchIO, torch, albumentations,
#                    batchgenerators v1 and v2 through the loader: per-item
#                    randomness, torch tensor results) on its own
#                    .venv-ecosystem holding only .[test,ecosystem]; `make test`
#                    never collects them (on the 2-core machine: the install
#                    about 50 s with an empty pip cache, the tests 65-90 s)
#   make soak        the TensorFlow exit and Ctrl-C scenarios, 20 runs each
#                    (the suite runs fewer, to stay under 10 minutes)
PYTHON ?= python3
OTHER_PYTHONS ?= 3.10 3.13
OTHER_PYTHONS_MARKS ?= not tf and not slow
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -rfEs --durations=12
VENV_STAMP := $(VENV)/.stamp-venv
DEMO_STAMP := $(VENV)/.stamp-demo
TEST_STAMP := $(VENV)/.stamp-test
BENCH_STAMP := $(VENV)/.stamp-bench
ECO_VENV := .venv-ecosystem
ECO_PY := $(ECO_VENV)/bin/python
ECO_STAMP := $(ECO_VENV)/.stamp-ecosystem
RAY_VENV := .venv-ray
RAY_PY := $(RAY_VENV)/bin/python
RAY_STAMP := $(RAY_VENV)/.stamp-ray
DOCS_VENV := .venv-docs
DOCS_PY := $(DOCS_VENV)/bin/python
DOCS_STAMP := $(DOCS_VENV)/.stamp-docs

.PHONY: demo test test-bench test-ecosystem test-ray docs bench soak clean

$(VENV_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	touch $@

$(DEMO_STAMP): $(VENV_STAMP)
	$(PIP) -e ".[demo]" tensorflow-cpu
	touch $@

$(TEST_STAMP): $(DEMO_STAMP)
	$(PIP) -e ".[test]"
	touch $@

$(BENCH_STAMP): $(DEMO_STAMP)
	$(PIP) -e ".[bench,ray]"
	touch $@

$(ECO_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(ECO_VENV)
	$(ECO_PY) -m pip install -q --upgrade pip
	$(ECO_PY) -m pip install -q -e ".[test,ecosystem]"
	touch $@

# -- the Ray backend: ray_tests/ on its own .venv-ray holding only .[test,ray]
# -- and tensorflow-cpu (dataset() on Ray), in a private network namespace with
# -- only loopback up (every address Ray binds is 127.0.0.1; needs root, as CI has)
$(RAY_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_PY) -m pip install -q --upgrade pip
	$(RAY_PY) -m pip install -q -e ".[test,ray]" tensorflow-cpu
	touch $@

test-ray: $(RAY_STAMP)
	unshare -n bash -c 'ip link set lo up && exec $(RAY_PY) -m pytest -q -p no:cacheprovider -rfEs --durations=12 ray_tests'

# -- the documentation site (docs/): .venv-docs holding only .[docs] (Sphinx,
# -- MyST, furo, matplotlib, Playwright).  The build (warnings are errors), then
# -- the Python code blocks of README.md and docs/ (docs_tests/run_blocks.py:
# -- each page on the first of these interpreters that can run the most of its
# -- blocks; .venv holds TensorFlow after `make demo`/`make test`,
# -- .venv-ecosystem MONAI and TorchIO; a block needing what none has is skipped
# -- and counted), then the site in headless Chromium (docs_tests/browser_check.py:
# -- internal links, screenshots in docs/_build/screenshots/).  Chromium is
# -- Debian's, installed here if missing; Playwright's own browsers are never
# -- downloaded.
$(DOCS_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_PY) -m pip install -q --upgrade pip
	$(DOCS_PY) -m pip install -q -e ".[docs]"
	touch $@

/usr/bin/chromium:
	@echo "installing Debian's chromium for the documentation's browser check"
	@export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -qq chromium >/dev/null 2>&1 || \
	{ apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }

docs: $(DOCS_STAMP) /usr/bin/chromium
	rm -rf docs/_build/html docs/_build/screenshots
	$(DOCS_PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	$(DOCS_PY) docs_tests/run_blocks.py --python $(PY) --python $(ECO_PY) --python $(RAY_PY)
	$(DOCS_PY) docs_tests/browser_check.py docs/_build/html

demo: $(DEMO_STAMP)
	$(PY) -u examples/medical_3d/demo.py

# Every run happens, and the target fails at the end if any of them failed.
test: $(TEST_STAMP)
	@status=0; \
	echo "== Python $$($(PY) -c 'import platform; print(platform.python_version())') ($(VENV)): pytest -m \"not bench\" tests"; \
	$(PYTEST) -m "not bench" tests || status=1; \
	OTHER_PYTHONS="$(OTHER_PYTHONS)" OTHER_PYTHONS_MARKS="$(OTHER_PYTHONS_MARKS)" \
		bash tests/other_pythons.sh || status=1; \
	exit $$status

test-bench: $(TEST_STAMP) $(BENCH_STAMP)
	$(PYTEST) -m bench tests

soak: $(TEST_STAMP)
	MPLOADER_SOAK=1 $(PYTEST) tests/test_tf_promises.py

test-ecosystem: $(ECO_STAMP)
	$(ECO_PY) -m pytest -q -p no:cacheprovider -rfEs --durations=12 ecosystem_tests

bench: $(BENCH_STAMP)
	$(PY) -u benchmarks/run.py

clean:
	rm -rf $(VENV) $(VENV)-3.* $(ECO_VENV) $(RAY_VENV) $(DOCS_VENV) docs/_build build *.egg-info
