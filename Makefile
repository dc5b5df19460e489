# The two quick-start commands: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch's cpp_extension must see the real toolkit root, not the folder of an nvcc wrapper on PATH.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: install install-dev demo test

install:
	$(PIP) install "torch>=2.6" "torchvision>=0.21" setuptools wheel
	$(PIP) install --no-build-isolation -e .

install-dev:
	$(PIP) install "torch>=2.6" "torchvision>=0.21" setuptools wheel
	$(PIP) install --no-build-isolation -e ".[dev]"

demo: install
	$(PYTHON) training/demo.py

test: install-dev
	$(PYTHON) -m pytest -q tests
