"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU: both trainers take one optimizer step on two processes and the update
equals the single-process update (docs/algorithms.md#layout-independence, under ZeRO sharding).

The launch config is the shipped ``examples/accelerate_configs/zero{2,3}.yaml`` with only what a CPU run needs
changed (``use_cpu: true``, two processes, no bf16): ``accelerate launch --cpu`` would drop DeepSpeed altogether.
DeepSpeed (``pip install gnivo-trl[deepspeed]``) runs on CPU through its CPU accelerator (``DS_ACCELERATOR=cpu``)
with gloo and its shared-memory collectives; no oneCCL or Intel extension is needed.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import deepspeed_cpu_launch, max_difference, max_magnitude
from trainer_harness import build_trainer, parameter_update

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install gnivo-trl[deepspeed]")

ROOT = Path(__file__).parents[1]
TOLERANCE = 1e-5  # relative to the largest parameter change


# VIMPO's hardest case under ZeRO-3: long completions on rank 0 and one-token ones on rank 1, and a KL chunk of 8
# tokens, so the ranks hold very different numbers of chunks (each head must be gathered once per pass by every rank,
# not once per chunk, or the collectives mismatch and the step hangs); and a float32 LM head (cast_lm_head_to_fp32),
# whose weight a ZeRO-3 gather must not hand out as the parameter itself.
VIMPO_ZERO_SETTINGS = dict(long_then_short=True, vimpo_kl_chunk_size=8, cast_lm_head_to_fp32=True)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_step_matches_one_process(stage, tiny_model_dir, tmp_path):
    out = tmp_path / "updates.pt"
    command = [
        *deepspeed_cpu_launch(stage, tmp_path),
        str(ROOT / "tests" / "deepspeed_step.py"),
        tiny_model_dir,
        str(out),
        json.dumps({"vimpo": VIMPO_ZERO_SETTINGS}),
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    saved = torch.load(out)
    for algorithm in ("gnivo", "vimpo"):
        run = saved[algorithm]
        assert run["stage"] == stage and run["engine"] == "DeepSpeedEngine"
        if algorithm == "vimpo":
            assert run["ref_model"] == "DeepSpeedEngine"  # the frozen reference is prepared by DeepSpeed too
        settings = VIMPO_ZERO_SETTINGS if algorithm == "vimpo" else {}
        reference = parameter_update(build_trainer(algorithm, tiny_model_dir, str(tmp_path / algorithm), **settings))
        assert max_magnitude(reference) > 1e-3
        assert max_difference(run["update"], reference) <= TOLERANCE * max_magnitude(reference)
