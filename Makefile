# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv and
# install everything they need (Python packages from PyPI, Prometheus from Debian for the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# llama-cpp-python compiles llama.cpp from its sdist, for the x86 level this CPU reports and never
# with -march=native (that build dies with SIGILL in the AMX kernel on VMs that report AMX but do
# not allow it): AVX2/FMA/F16C on every machine, AVX-512 (+ VBMI, VNNI, BF16 where listed) where
# /proc/cpuinfo lists AVX-512 F/BW/VL: ~1.4x cheaper profiles (docs/profiles.md). The wheel is
# built once per set of flags into LLAMA_WHEELS (pip's own cache does not key on CMAKE_ARGS, so it
# could hand an AVX-512 wheel to another CPU); the backend refuses a build this CPU cannot run.
LLAMA_VERSION := 0.3.36
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
AVX512 := $(if $(filter 3,$(words $(filter avx512f avx512bw avx512vl,$(CPU_FLAGS)))),ON,OFF)
avx512_ext = $(if $(filter ON,$(AVX512)),$(if $(filter $(1),$(CPU_FLAGS)),ON,OFF),OFF)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_BMI2=ON -DGGML_AVX512=$(AVX512) -DGGML_AVX512_VBMI=$(call avx512_ext,avx512vbmi) \
	-DGGML_AVX512_VNNI=$(call avx512_ext,avx512_vnni) -DGGML_AVX512_BF16=$(call avx512_ext,avx512_bf16) \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF
LLAMA_WHEELS := $(HOME)/.cache/dynllm/llama-cpp-python-$(LLAMA_VERSION)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

.PHONY: install demo test lint bench prometheus clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first, so nothing can pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	  $(BIN)/pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	$(BIN)/pip install -q $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Debian's prometheus package: server + promtool, used by the monitoring tests.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  service prometheus stop >/dev/null 2>&1 || true; }

demo: install
	BIN=$(BIN) bash deploy/demo.sh

test: install prometheus
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
