# Everything set-up happens here: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test lint format demo learning-benchmark overhead-benchmark credit-benchmark gpu-check clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
	$(PIP) install -q -c constraints-cpu.txt torch
	$(PIP) install -q -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check gnivo_trl tests examples benchmarks
	$(PY) -m ruff format --check gnivo_trl tests examples benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check gnivo_trl tests examples benchmarks
	$(PY) -m ruff format --check gnivo_trl tests examples benchmarks

format: $(STAMP)
	$(PY) -m ruff check --fix gnivo_trl tests examples benchmarks
	$(PY) -m ruff format gnivo_trl tests examples benchmarks

# Offline: the demo builds its models in process (and the library itself leaves these variables alone).
OFFLINE := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

demo: $(STAMP)
	$(OFFLINE) $(PY) -m gnivo_trl.demo --output-dir demo_output

# Benchmarks write their tables and plots into benchmarks/results/ (tens of minutes on 2 CPU cores).
learning-benchmark: $(STAMP)
	$(PY) benchmarks/learning.py

overhead-benchmark: $(STAMP)
	$(PY) benchmarks/overhead.py --lengths 256 1024 4096 --repeats 5

# Step-error localisation by implied credit (benchmarks/results/credit.md; resumable, cached under .cache/).
credit-benchmark: $(STAMP)
	$(PY) benchmarks/credit.py

# One CUDA GPU, under 8 minutes (benchmarks/README.md, "GPU check"); runs .venv/bin/python if present, else python3.
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output
