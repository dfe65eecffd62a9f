# ov_seg: set up, run the main job on the embedded toy world, test, lint.
#   make demo   set up .venv (if missing) and run the main job on the toy world
#   make test   set up .venv (if missing) and run the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets
# test processes (one torch thread each): the free cores, as ov_seg.utils.threads counts them
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; n = len(os.sched_getaffinity(0)); e = os.environ.get('OMP_NUM_THREADS', ''); print(max(1, min(n, int(e))) if e.isdigit() and int(e) > 0 else n)")
export NLTK_DATA ?= $(abspath $(CURDIR)/../shared/nltk_data)

.PHONY: setup demo test lint format clean-output

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements.txt requirements-detectron2.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23" wheel
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	@# keep a detectron2 built from source; otherwise take the PyPI build
	@$(PY) -c "import detectron2" 2>/dev/null || $(PY) -m pip install -r requirements-detectron2.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@touch $@

demo: setup
	$(PY) tools/run_main_job.py --output output

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

lint: setup
	$(PY) -m black --check -l 100 ov_seg tools tests datasets
	$(PY) -m isort --check-only ov_seg tools tests datasets
	$(PY) -m flake8 ov_seg tools tests datasets

format: setup
	$(PY) -m isort ov_seg tools tests datasets
	$(PY) -m black -l 100 ov_seg tools tests datasets
