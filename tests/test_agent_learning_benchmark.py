"""benchmarks/agent_learning.py: one tiny cached run end to end, and its report's paired differences."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import agent_learning  # noqa: E402


def _run(method: str, seed: int, final: float) -> dict:
    return {
        "method": method,
        "seed": seed,
        "accuracy": [[0, 0.3], [10, final]],
        "seconds_total": 60.0,
        "seconds_training": 50.0,
    }


def test_report_pairs_each_method_with_grpo_by_seed():
    runs = [_run("grpo", seed, 0.5 + 0.1 * seed) for seed in (0, 1, 2)]
    runs += [_run("gnivo-turn", seed, 0.53 + 0.1 * seed) for seed in (0, 1, 2)]
    args = argparse.Namespace(
        steps=10, prompts_per_step=8, num_generations=8, learning_rate=2e-4, eval_problems=300, eval_every=10
    )
    text = agent_learning.report(runs, args, "python benchmarks/agent_learning.py")
    row = next(line for line in text.splitlines() if line.startswith("| gnivo-turn |"))
    assert "+3.0 [+3.0, +3.0]" in row  # the same offset on every seed: a zero-width interval
    assert "| grpo | 3 | 30.0 | 60.0 ± 10.0 | – |" in text


@pytest.mark.slow
def test_one_tiny_run_per_method_is_cached_and_reported(tmp_path, monkeypatch):
    from gnivo_trl.agent_task import ToolWarmStartConfig

    tiny = ToolWarmStartConfig(
        num_steps=2, num_examples=96, epochs=1.0, batch_size=16, hidden_size=16, intermediate_size=32, eval_problems=8
    )
    monkeypatch.setattr(agent_learning, "WARM_START", tiny)
    argv = ["--steps", "1", "--eval-problems", "4", "--eval-every", "1", "--seeds", "0", "--methods", "grpo", "vimpo"]
    argv += ["--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")]
    agent_learning.main(argv)
    agent_learning.main([*argv, "--report-only", "--report", str(tmp_path / "agent.md")])
    report = (tmp_path / "agent.md").read_text()
    assert "| vimpo | 1 |" in report and (tmp_path / "agent.png").exists()
