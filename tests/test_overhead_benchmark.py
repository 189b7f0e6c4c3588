"""benchmarks/overhead.py runs end to end at a tiny length and writes both scenarios' tables."""

import math
import re

import pytest

from benchmarks import overhead


@pytest.mark.slow
def test_overhead_benchmark_writes_both_scenarios(tmp_path):
    output = tmp_path / "overhead.md"
    methods = ["grpo", "grpo+ref", "gnivo/token", "vimpo/exact"]
    argv = ["--lengths", "16", "--repeats", "1", "--methods", *methods, "--old-logps-methods", *methods]
    argv += ["--kl-memory-tokens", "2048"]  # more than one chunk of the default vimpo_kl_chunk_size (1024)
    assert overhead.main([*argv, "--output", str(output)]) == 0
    report = output.read_text()
    assert "## Scenario `aligned`" in report and "## Scenario `old-logps`" in report
    rows = [line for line in report.splitlines() if line.startswith("| vimpo/exact | ")]
    assert len(rows) == 8  # four tables per scenario
    time_ratios = [float(value) for value in re.findall(r"\| ([0-9.]+) / ([0-9.]+) \|", rows[0])[0]]
    assert all(math.isfinite(value) and value > 0 for value in time_ratios)
    baseline = [line for line in report.splitlines() if line.startswith("| grpo | ")][0]
    assert baseline.startswith("| grpo | 1.000 / ")  # each method's ratio to itself is exactly one
    assert report.count(overhead.KL_MEMORY_TITLE) == 1
    chunked = [line for line in report.splitlines() if line.startswith("| VIMPO chunked | ")][0]
    assert 0 < float(chunked.split(" | ")[2]) < 1.0  # chunked below naive

    # Re-measuring only the exact-KL section replaces it instead of appending a second one.
    assert overhead.main([*argv, "--output", str(output), "--kl-memory-only"]) == 0
    again = output.read_text()
    assert again.count(overhead.KL_MEMORY_TITLE) == 1
    assert again.split(overhead.KL_MEMORY_TITLE)[0] == report.split(overhead.KL_MEMORY_TITLE)[0]


@pytest.mark.parametrize("method", ["grpo", "gnivo/token", "vimpo/exact"])
def test_measured_steps_run_with_gradient_checkpointing(method, tmp_path):
    """The module says its steps run with gradient checkpointing. Calling compute_loss directly skips Trainer.train(),
    which is what turns it on, so build_trainer turns it on the same way: the inside of each decoder layer of the
    policy runs twice in a measured step (its forward, and again in the backward), not once."""
    model_dir = overhead.build_model_dir(tmp_path / "model", "cpu")
    trainer, rows = overhead.build_trainer(method, model_dir, "cpu", 16, str(tmp_path / "out"))
    assert trainer.args.gradient_checkpointing
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert policy.is_gradient_checkpointing
    mlp, calls = policy.model.layers[0].mlp, []
    forward = mlp.forward  # counted on the function: torch's recomputation runs no module hooks

    def counted_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    mlp.forward = counted_forward
    overhead.one_step(trainer, rows, "cpu")
    assert len(calls) == 2
