# The two quick-start commands: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch's cpp_extension must see the real toolkit root, not the folder of an nvcc wrapper on PATH.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: install install-dev demo test ui-test

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

# The web demo's browser test: the [ui] extra (Gradio), selenium, and Debian's chromium + chromedriver.
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ui-test: install-dev
	$(PIP) install --no-build-isolation -e ".[ui]" selenium
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver; fi
	$(PYTHON) -m pytest -q tests/test_ui.py tests/test_ui_process.py
