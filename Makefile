# Set-up and everyday commands. Each target creates the virtual environment first if it is missing or stale.
#   make demo    prepare a real music corpus, train PoPE and RoPE on CPU, compare them
#   make test    the whole test suite (what CI runs)
#   make bench   the benchmarks under bench/
#   make tiny-data  small real datasets for configs/tiny/ under data/tiny/
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# Every pip command carries the constraints file: it pins torch so no dependency swaps in a CUDA build.
PIP     = $(PY) -m pip install --quiet --constraint constraints.txt
STAMP   = $(VENV)/.installed
# The oldest transformers the `hf` extra allows (its lower bound in pyproject.toml) and a tokenizers it works
# with, installed beside the venv: tests/test_hf_export.py loads exports with it as well as with the venv's own.
OLDEST_TRANSFORMERS = transformers==4.46.3 tokenizers==0.20.3
PYTEST_ARGS ?=

.PHONY: venv demo test bench tiny-data clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch
	$(PIP) --editable ".[dev]"
	$(PIP) --upgrade --no-deps --target $(VENV)/oldest-transformers $(OLDEST_TRANSFORMERS)
	touch $@

demo: $(STAMP)
	$(VENV)/bin/pope demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/prep_throughput.py
	$(PY) bench/train_step.py

tiny-data: $(STAMP)
	$(PY) tests/tiny_data.py data/tiny

clean:
	rm -rf $(VENV) build *.egg-info
