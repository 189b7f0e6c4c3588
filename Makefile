# Everything set-up happens here: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test lint format demo learning-benchmark fair-comparison-benchmark paper-claims-benchmark \
	agents-benchmark credit-benchmark overhead-benchmark gpu-check clean

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

demo: $(STAMP)
	$(PY) -m gnivo_trl.demo --output-dir demo_output

# One command per benchmark study (benchmarks/README.md); each writes into benchmarks/results/<study>/ and caches its
# runs under .cache/, so an interrupted study resumes. Learning studies run two processes (one per core), one torch
# thread each; hours on 2 CPU cores.
SHARDS = for i in 0 1; do OMP_NUM_THREADS=1 $(PY) -m benchmarks.$(1) all --shard $$i/2 --no-report & done; wait

learning-benchmark: $(STAMP)
	$(PY) -m benchmarks.learning

fair-comparison-benchmark: $(STAMP)
	$(call SHARDS,fair_comparison)
	$(PY) -m benchmarks.fair_comparison report

paper-claims-benchmark: $(STAMP)
	$(call SHARDS,paper_claims)
	$(PY) -m benchmarks.paper_claims report

agents-benchmark: $(STAMP)
	$(call SHARDS,agent_learning)
	$(PY) -m benchmarks.agent_learning report

# Step-error localisation by implied credit (benchmarks/results/credit/credit.md).
credit-benchmark: $(STAMP)
	$(PY) -m benchmarks.credit

overhead-benchmark: $(STAMP)
	$(PY) -m benchmarks.overhead --lengths 256 1024 4096 --repeats 5

# One CUDA GPU, under 8 minutes (benchmarks/README.md, "GPU check"); runs .venv/bin/python if present, else python3.
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output
