# Smart-Diffusion: `make demo` and `make test` set up everything on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= shapes-flux
SYSTEM ?= cpu
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
OPENAI_PORT ?= 8080
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install weights repository demo serve test test-fast lint clean bench-serve soak

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

weights: install
	$(PY) scripts/build_tiny_models.py

# Regenerate the committed default repository's configs (a test checks they are current).
repository: install
	$(PY) -c "from smart_diffusion_backend.repository import *; write_repository('model_repository', [DEFAULT_MODEL], DEFAULT_SYSTEM)"

demo: weights
	$(PY) scripts/demo.py --out outputs/demo.png --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

serve: weights
	$(PY) scripts/serve.py --model $(MODEL) --system $(SYSTEM) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) --openai-port $(OPENAI_PORT)

test: weights
	$(PY) -m pytest -q -p no:cacheprovider tests

# No tritonserver, no worker processes: the quick loop while editing.
test-fast: weights
	SMART_DIFFUSION_FORBID_WORKERS=1 $(PY) -m pytest -q -p no:cacheprovider -m "not server and not pool" tests

# ruff, configured in pyproject.toml (pyflakes, pycodestyle errors and warnings, import order)
lint: install
	$(PY) -m ruff check .

clean:
	rm -rf build outputs .triton

# Serving throughput vs concurrency (bench client + perf_analyzer); results to bench/results/.
.pa/bin/perf_analyzer:
	dpkg -s libb64-0d >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q libb64-0d)
	$(PYTHON) -m venv .pa
	.pa/bin/pip install -q --no-deps tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.79

bench-serve: weights .pa/bin/perf_analyzer
	$(PY) -m bench.serve_throughput --out bench/results/serving/serve-throughput-cpu.md

# Mixed valid/invalid/hostile load at concurrency 8 for SOAK_S seconds, in 4 server rounds each stopped
# by another signal; summary to bench/results/soak/soak-cpu.md.
SOAK_S ?= 600
soak: weights
	$(PY) -m bench.soak --duration-s $(SOAK_S) --concurrency 8 --out bench/results/soak/soak-cpu.md
