# Set-up on a fresh machine with Python 3.11 and make:
#   make demo    build the demo MoE model into engines/demo/
#   make test    run the whole test suite (two workers; the durations of the slowest tests at the end)
#   make test-fast  the unit and pass tests only (not the exports, builds, servers and benchmarks marked slow)
#   make serve   serve the demo build with Triton Inference Server (CPU) on 127.0.0.1
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Triton's server and python backend (bundled by nvidia-pytriton) need numpy<2, so the served
# models run in an environment of their own.
SERVE_ENV := .venv-serve
SERVE_STAMP := $(SERVE_ENV)/.installed
# Triton's load generators, genai-perf and perf_analyzer (in tritonclient 2.51.0's wheel: PyPI's
# perf-analyzer wheels need glibc 2.38), with the two libraries perf_analyzer loads: libb64
# (Debian's libb64-0d, unpacked here) and libcudart (a pip wheel; no GPU is needed).
PERF_ENV := .venv-perf
PERF_STAMP := $(PERF_ENV)/.installed

.PHONY: demo test test-fast serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[torch,bench,serve,test,tensorrt-rtx]'
	# TensorRT's headers for the C++ plugin's build test, pinned by version and hash (see the file).
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r plugins/lynx_moe/tensorrt-headers.txt
	touch $(STAMP)

# tokenizers: the generate model's text in and out (tokenizer.json).
$(SERVE_STAMP): Makefile
	$(PYTHON) -m venv $(SERVE_ENV)
	$(SERVE_ENV)/bin/python -m pip install --quiet 'numpy<2' onnxruntime 'nvidia-pytriton==0.7.0' tokenizers
	touch $(SERVE_STAMP)

$(PERF_STAMP): Makefile
	$(PYTHON) -m venv $(PERF_ENV)
	$(PERF_ENV)/bin/python -m pip install --quiet 'genai-perf==0.0.16' 'tritonclient[all]==2.51.0' nvidia-cuda-runtime-cu12
	cd $(PERF_ENV) && rm -rf libb64 libb64-0d_*.deb && apt-get download libb64-0d && dpkg-deb -x libb64-0d_*.deb libb64 && rm libb64-0d_*.deb
	touch $(PERF_STAMP)

demo: $(STAMP)
	$(BIN)/lynx-export demo-model engines/demo-source/model.onnx
	$(BIN)/lynx-export inspect engines/demo-source/model.onnx
	$(BIN)/lynx-export build engines/demo-source/model.onnx -o engines/demo --backend tensorrt-rtx --force --triton-repo engines/triton

# Two workers (pytest-xdist): shared artefacts are built once for both (tests/artifacts.py).
PYTEST_PARALLEL := -n 2 --dist worksteal --durations=25

test: $(STAMP) $(SERVE_STAMP) $(PERF_STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow"

serve: $(STAMP) $(SERVE_STAMP) $(PERF_STAMP)
	@test -d engines/triton || $(MAKE) demo
	$(BIN)/lynx-export serve engines/triton --env $(SERVE_ENV)

clean:
	rm -rf $(VENV) $(SERVE_ENV) $(PERF_ENV) engines/demo engines/demo-source engines/triton engines/bench engines/accuracy .pytest_cache
