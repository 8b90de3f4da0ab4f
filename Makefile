# Thin wrappers; each target is one line of real work. Everything installs from this repository's
# own files into .venv (torch 2.13.0 CPU wheel, megatron-core 0.16.1, the C++ extension).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv quickstart test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)  # kernel sources rebuild megatron_mm._C
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 setuptools wheel pybind11 && $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

# make quickstart QUICKSTART_ITERS=30: a shorter run (still stopping at two thirds, then resuming)
QUICKSTART_ITERS ?= 300

quickstart: venv
	$(PY) examples/quickstart.py --iters $(QUICKSTART_ITERS)

test: venv
	$(PY) -m pytest tests -q

bench: venv
	$(PY) bench/preprocess.py && $(PY) bench/memory.py && $(PY) bench/convert_memory.py

clean:
	rm -rf build megatron_mm/_C*.so outputs data/quickstart
