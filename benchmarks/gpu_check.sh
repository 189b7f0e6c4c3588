#!/usr/bin/env bash
# One-command GPU check (benchmarks/README.md, "GPU check"): overhead against GRPO, the H100 anchor, 20 end-to-end
# training steps per trainer, CUDA-only numerics and DeepSpeed ZeRO-2/3, in one Markdown report,
# benchmarks/results/gpu_check/gpu_<device-name>.md by default. Under 8 minutes on one H200.
#
# On a CUDA machine whose Python has torch, transformers and accelerate but no network, with .whl/ made by
# shared/gpu/fetch-wheels.sh carried in the project root:
#   bash .whl/install-on-gpu.sh && export PYTHONPATH=$PWD:$PWD/.whl/site:$PWD/.whl/site-ds && bash benchmarks/gpu_check.sh
# Arguments are passed to `python -m benchmarks.gpu_check` (--output PATH, --budget-s SECONDS, --parts ..., --smoke).
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_CHECK_START=$(date +%s)  # the budget counts from here, interpreter start-up and imports included
export GPU_CHECK_START
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_COMMAND="bash benchmarks/gpu_check.sh${*:+ $*}"
# Nothing may come from the Hugging Face Hub: models and tokenizers are built in process.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import torch, transformers, accelerate, trl" || {
  echo "gpu_check: torch, transformers, accelerate and trl must import (see benchmarks/README.md, GPU check)" >&2
  exit 2
}
exec "$PYTHON" -m benchmarks.gpu_check "$@"
