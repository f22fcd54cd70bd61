# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch, installed before the package so its `torch>=2.1` range is already
# satisfied (otherwise pip may pull a multi-GB CUDA build); see DEVELOPERS.md.
TORCH_SPEC ?= torch==2.13.0
# What napari's Qt tests need on a headless Debian/Ubuntu machine: a virtual X server and the
# X11/OpenGL libraries Qt's xcb platform loads; and a C compiler, which compiles the C export
# in its tests.
APT_PACKAGES := xvfb xauth libgl1 libegl1 libfontconfig1 libdbus-1-3 libxkbcommon-x11-0 \
	libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxcb-render-util0 \
	libxcb-image0 libxcb-shape0 libxcb-randr0 gcc libc6-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast lint system-deps screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-testing: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[testing]"
	touch $@

system-deps:
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	else echo "Install Xvfb and the Qt xcb libraries with your package manager: $(APT_PACKAGES)"; \
	fi

demo: $(VENV)/.installed
	$(BIN)/unetquant demo

lint: $(VENV)/.installed-testing
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/npe2 validate --imports napari-unetquant

test: $(VENV)/.installed-testing system-deps lint
	$(BIN)/python -m pytest

# The inner loop: everything but the end-to-end training, widget and multi-process runs
# (marked slow); make test and CI run those too.
test-fast: $(VENV)/.installed-testing system-deps
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -m "not slow"

# The README's picture: the real widgets on the generated sample, under a virtual screen.
screenshots: $(VENV)/.installed-testing system-deps
	xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python benchmarks/screenshots.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
