"""benchmarks/overhead.py runs end to end at a tiny length and writes both scenarios' tables."""

import math
import re

import pytest

from benchmarks import overhead


@pytest.mark.slow
def test_overhead_benchmark_writes_both_scenarios(tmp_path):
    """End to end on the baselines and VIMPO (GN-IVO's step is measured below): both scenarios' four tables, and the
    exact-KL memory section at more than one chunk of the default vimpo_kl_chunk_size (1024)."""
    output = tmp_path / "overhead.md"
    methods = ["grpo", "grpo+ref", "vimpo/exact"]
    argv = ["--lengths", "16", "--repeats", "1", "--methods", *methods, "--old-logps-methods", *methods]
    argv += ["--kl-memory-tokens", "2048"]
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


def test_remeasuring_the_kl_memory_section_replaces_it(tmp_path, monkeypatch):
    """``--kl-memory-only`` puts the new section in place of the old one and keeps everything above it. The
    measurement itself is covered above; here ``kl_memory_section`` returns fixed sections, one per call."""
    output = tmp_path / "overhead.md"
    above = "# Overhead\n\n## Scenario `aligned`\n\n| grpo | 1.000 / 0.900 |\n"
    output.write_text(above)
    sections = iter(
        [
            ["", f"{overhead.KL_MEMORY_TITLE} (T=2048)", "", "| naive | 100 | 1.000 | - |"],
            ["", f"{overhead.KL_MEMORY_TITLE} (T=4096)", "", "| naive | 200 | 1.000 | - |"],
        ]
    )
    monkeypatch.setattr(overhead, "kl_memory_section", lambda tokens, device, command, shape_name=None: next(sections))
    for tokens in ("2048", "4096"):
        assert overhead.main(["--kl-memory-only", "--kl-memory-tokens", tokens, "--output", str(output)]) == 0
    report = output.read_text()
    assert report.count(overhead.KL_MEMORY_TITLE) == 1 and "(T=4096)" in report and "(T=2048)" not in report
    assert report.startswith(above)
    # Into a file that does not exist yet: the section alone, without the leading blank line.
    first = ["", f"{overhead.KL_MEMORY_TITLE} (T=2048)", "", "| naive | 100 | 1.000 | - |"]
    alone = overhead.replace_kl_memory_section(tmp_path / "new" / "overhead.md", first)
    assert alone == "\n".join(first[1:]) + "\n"


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
