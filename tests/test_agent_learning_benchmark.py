"""benchmarks/agent_learning.py: validation split, rate choice per noise level, reports paired by seed (synthetic
cached runs), and one tiny run per part end to end."""

import json
from pathlib import Path

import pytest

from benchmarks import agent_learning, protocol


def _result(run, final: float) -> dict:
    return {
        **run,
        "key": run.key,
        "accuracy": [[0, 0.3], [10, final]],
        "seconds_total": 60.0,
        "seconds_training": 50.0,
        "provenance": {"commit": "a" * 40, "dirty": False, "torch": "t", "transformers": "x", "trl": "y"},
    }


def _write(work: Path, result: dict) -> None:
    (work / f"{result['key']}.json").write_text(json.dumps(result))


def test_validation_problems_are_disjoint_from_rl_prompts_sft_rollouts_and_test():
    from gnivo_trl.synthetic import generate_problems, is_test_problem

    validation = agent_learning.validation_problems(200)
    config = agent_learning.warm_start_config()
    assert len(set(validation)) == 200 and not any(map(is_test_problem, validation))
    used = set(generate_problems(4096, "train", config.num_steps, seed=0))
    used |= set(generate_problems(config.num_examples, "train", config.num_steps, seed=2000 + config.seed))
    assert not used & set(validation)


def test_rloo_on_the_agent_task_is_grpo_with_leave_one_out_advantages():
    family, settings = agent_learning.METHODS["rloo"]
    assert family == "grpo" and settings == protocol.RLOO_AS_GRPO


def test_report_pairs_each_method_with_grpo_by_seed_under_each_noise(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_learning, "LEARNING_RATES", [1e-4, 2e-4])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(SystemExit, match="incomplete"):
        agent_learning.chosen_rates(0.25, work)
    for noise in agent_learning.NOISES:
        best = 2e-4 if noise else 1e-4
        for run in agent_learning.tuning_runs(noise):
            _write(work, _result(run, 0.6 if run["overrides"]["learning_rate"] == best else 0.5))
        assert set(agent_learning.chosen_rates(noise, work).values()) == {best}
        for run in agent_learning.test_runs(noise, work):
            offset = 0.03 if run["method"] == "gnivo-turn" else 0.0
            _write(work, _result(run, 0.5 + 0.1 * (run["seed"] - 10) + offset - noise / 5))
    for run in agent_learning.shared_rate_runs():
        _write(work, _result(run, 0.7))
    written = agent_learning.report(work, tmp_path)
    assert [path.name for path in written] == ["agent_learning.md", "agent_learning_shared_rate.md"]
    text = written[0].read_text()
    clean, noisy = text.split("## Noisy rewards, p = 0.25")
    row = next(line for line in noisy.splitlines() if line.startswith("| gnivo-turn | 0.0002 |"))
    assert row.count("+3.0 [+3.0, +3.0]") == 2  # against GRPO and RLOO; the same offset on every seed: zero width
    assert "final − GRPO (pp) [95% CI] | final − RLOO (pp) [95% CI] |" in clean
    drops = noisy.split("Drop from the clean run")[1]
    drop = next(line for line in drops.splitlines() if line.startswith("| gnivo-turn | "))
    assert drop.endswith("| +5.0 [+5.0, +5.0] |")  # clean − noisy, paired by seed: noise / 5 on every seed
    assert "Drop from the clean run" not in clean
    assert "| grpo | 0.0001 | 5 | 30.0 | 70.0 ± 15.8 | – |" in clean
    assert "Provenance: runs produced at package commit aaaaaaaaaa" in text
    assert (tmp_path / "agent_learning.png").exists() and (tmp_path / "agent_learning_noise025.png").exists()


@pytest.mark.slow
def test_one_tiny_run_per_method_is_cached_and_reported(tmp_path, monkeypatch):
    from gnivo_trl.agent_task import ToolWarmStartConfig

    tiny = ToolWarmStartConfig(
        num_steps=2, num_examples=96, epochs=1.0, batch_size=16, hidden_size=16, intermediate_size=32, eval_problems=8
    )
    monkeypatch.setattr(agent_learning, "WARM_START", tiny)
    monkeypatch.setattr(agent_learning, "STEPS", 1)
    monkeypatch.setattr(agent_learning, "EVAL_PROBLEMS", 4)
    monkeypatch.setattr(agent_learning, "EVAL_EVERY", 1)
    monkeypatch.setattr(agent_learning, "LEARNING_RATES", [2e-4])
    monkeypatch.setattr(agent_learning, "TUNING_SEEDS", [0])
    monkeypatch.setattr(agent_learning, "TEST_SEEDS", [10])
    monkeypatch.setattr(agent_learning, "NOISES", [0.5])
    methods = {name: agent_learning.METHODS[name] for name in ("grpo", "rloo")}
    monkeypatch.setattr(agent_learning, "METHODS", methods)
    argv = ["--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")]
    agent_learning.main(["all", *argv, "--results-dir", str(tmp_path / "results")])
    report = (tmp_path / "results" / "agent_learning.md").read_text()
    assert "| rloo | 0.0002 | 1 |" in report and (tmp_path / "results" / "agent_learning_noise05.png").exists()
    cached = json.loads(next((tmp_path / "work").glob("h4-rloo-seed10-test-*noise=0.5.json")).read_text())
    assert cached["reward_noise"]["scored"] == 64 and cached["provenance"]["trl"]
