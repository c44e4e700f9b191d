# Two commands on a fresh machine: `make serve` and `make test`. Everything else is set up on the way:
# the venv with pinned deps, the llama-cpp-python wheel (built from source once, then cached), the models.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
CACHE := $(or $(SPECSERVE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/specserve)
LLAMA_VERSION := 0.3.36
# The wheel is built for this CPU (without llama.cpp's crashing AMX kernels, see specserve/hardware.py) and
# cached under a key of version, build flags and ISA flags: a cache from another CPU is never reused.
LLAMA_CMAKE_ARGS := $(shell $(PYTHON) -m specserve.hardware llama-cmake-args)
LLAMA_KEY := $(shell $(PYTHON) -m specserve.hardware llama-key $(LLAMA_VERSION))
WHEELS := $(CACHE)/wheels/llama-cpp-python-$(LLAMA_KEY)
LLAMA_WHEEL_GLOB := $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
# arctic-inference (the suffix trees, engine/suffix.py) ships as an sdist whose build wants torch; it is built
# once against the venv's CPU torch (no -march flags: portable) and cached per version and Python. Its CMake
# looks for the Python (and so nanobind) on PATH, hence the venv's bin first.
ARCTIC_VERSION := 0.3.0
ARCTIC_BUILD_DEPS := setuptools==84.2.1 nanobind==2.9.2 ninja==1.13.2 cmake==4.4.5
ARCTIC_WHEELS := $(CACHE)/wheels/arctic-inference-$(ARCTIC_VERSION)-$(shell $(PYTHON) -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
STAMP := $(VENV)/.installed-$(LLAMA_KEY)-arctic-$(ARCTIC_VERSION)
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup models redis browser serve test fuzz test-quick lint bench info proto clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel
	@if ! ls $(LLAMA_WHEEL_GLOB) >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_VERSION) for this CPU (~6-10 min on 2 cores; cached in $(WHEELS))"; \
		echo "CMAKE_ARGS: $(or $(LLAMA_CMAKE_ARGS),(native build))"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --no-cache-dir --no-deps --progress-bar on \
			-w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION); \
	fi
	$(PY) -m pip install --quiet --no-deps --force-reinstall $(LLAMA_WHEEL_GLOB)
	$(PY) -m pip install --quiet --find-links $(WHEELS) -r requirements.lock
	@if ! ls $(ARCTIC_WHEELS)/arctic_inference-$(ARCTIC_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building arctic-inference $(ARCTIC_VERSION) (suffix trees; ~1 min, cached in $(ARCTIC_WHEELS))"; \
		$(PY) -m pip install --quiet $(ARCTIC_BUILD_DEPS) && \
		PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip wheel --quiet --no-cache-dir --no-deps --no-build-isolation \
			-w $(ARCTIC_WHEELS) arctic-inference==$(ARCTIC_VERSION); \
	fi
	$(PY) -m pip install --quiet --no-deps $(ARCTIC_WHEELS)/arctic_inference-$(ARCTIC_VERSION)-*.whl
	$(PY) -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

models: setup
	$(VENV)/bin/specserve fetch

# The cache tests run a real redis-server (Debian package); install it once if it is missing.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing redis-server (apt-get)"; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	}

# The web page tests drive Debian's chromium through Playwright (no browser download); install it once.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing chromium (apt-get)"; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	}

serve: models
	$(VENV)/bin/specserve serve --host $(HOST) --port $(PORT)

# First a real one-token eval of every backend, each in its own process: a kernel that crashes on this CPU
# fails here in seconds, by name, not inside a test fixture.
test: models redis browser
	$(VENV)/bin/specserve info --check
	$(PY) -m pytest $(PYTEST_ARGS)

# A longer run of the HTTP API fuzzing than the suite's (tests/test_fuzz.py): EXAMPLES per operation.
fuzz: models
	SPECSERVE_FUZZ_EXAMPLES=$(or $(EXAMPLES),500) $(PY) -m pytest tests/test_fuzz.py $(PYTEST_ARGS)

test-quick: setup redis
	$(PY) -m pytest -m "not models and not small_model" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check specserve tests
	$(VENV)/bin/ruff format --check specserve tests

# The gRPC stubs are committed; regenerate them after editing the .proto (grpcio-tools from requirements.lock).
proto: setup
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. specserve/cluster/verifier.proto

bench: models
	$(VENV)/bin/specserve bench

info: models
	$(VENV)/bin/specserve info

clean:
	rm -rf $(VENV) bench-out .pytest_cache
