# Smart-Diffusion: `make demo` and `make test` set up everything on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= tiny-flux
SYSTEM ?= cpu
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install weights repository demo serve test test-fast clean

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
	$(PY) -c "from smart_diffusion_backend.repository import write_repository; write_repository('model_repository', ['tiny-flux'], 'cpu')"

demo: weights
	$(PY) scripts/demo.py --out outputs/demo.png --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

serve: weights
	$(PY) scripts/serve.py --model $(MODEL) --system $(SYSTEM) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: weights
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: weights
	$(PY) -m pytest -q -p no:cacheprovider -m "not server" tests

clean:
	rm -rf build outputs .triton
