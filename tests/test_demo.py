"""``make demo`` (``python -m gnivo_trl.demo``) runs end to end offline: warm start, GN-IVO, report, plot, model."""

import json

import pytest

from gnivo_trl.demo import main, parse_arguments, reward_sparkline


def test_reward_sparkline_maps_zero_to_one_onto_bars():
    assert reward_sparkline([0.0, 0.5, 1.0]) == " ▄█"
    assert reward_sparkline([-1.0, 2.0]) == " █"  # clipped to the range
    assert reward_sparkline([]) == ""


def test_task_argument_selects_the_agent_task_and_its_defaults():
    default = parse_arguments([])
    assert (default.task, default.prefix_unit, default.learning_rate) == ("arithmetic", "step", 2e-4)
    tools = parse_arguments(["--task", "tools", "--steps", "3"])
    assert (tools.task, tools.prefix_unit, tools.learning_rate, tools.steps) == ("tools", "turn", 2e-4, 3)
    chosen = parse_arguments(["--task", "tools", "--prefix-unit", "token", "--learning-rate", "5e-4"])
    assert (chosen.prefix_unit, chosen.learning_rate) == ("token", 5e-4)
    with pytest.raises(SystemExit):
        parse_arguments(["--task", "chess"])


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_a_model(tmp_path, capsys):
    summary = main(
        [
            "--output-dir",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--warm-start-examples",
            "640",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--eval-problems",
            "16",
            "--prompts-per-step",
            "2",
        ]
    )
    out = tmp_path / "out"
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    assert (out / "demo.png").stat().st_size > 1000
    written = json.loads((out / "summary.json").read_text())
    assert written["steps"] == 2 and written["prefix_unit"] == "step"
    assert [step for step, _ in written["accuracy_history"]] == [0, 1, 2]
    assert written["test_accuracy_before"] == written["accuracy_history"][0][1]
    assert written["test_accuracy_after"] == summary["accuracy_history"][-1][1]
    assert len(written["rewards"]) == 2 and all(0.0 <= r <= 1.0 for r in written["rewards"])
    printed = capsys.readouterr().out
    assert "Test accuracy before GN-IVO" in printed and "Reward curve" in printed
    assert "warm start" in printed.lower() and "step    2/2" in printed


@pytest.mark.slow
def test_tools_demo_runs_end_to_end(tmp_path, capsys):
    """``--task tools`` with a one-step warm start: the tool loop, turn units and the multi-turn evaluation run."""
    summary = main(
        [
            "--task",
            "tools",
            "--output-dir",
            str(tmp_path / "out"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--warm-start-examples",
            "64",
            "--steps",
            "1",
            "--eval-every",
            "1",
            "--eval-problems",
            "4",
            "--prompts-per-step",
            "2",
            "--num-generations",
            "4",
        ]
    )
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["task"] == "tools" and written["prefix_unit"] == "turn" and written["steps"] == 1
    assert [step for step, _ in written["accuracy_history"]] == [0, 1]
    assert summary["test_accuracy_after"] == written["accuracy_history"][-1][1]
    assert list((tmp_path / "cache").glob("tool-warm-start-*/warm_start.json"))
    printed = capsys.readouterr().out
    assert "calculator tool" in printed and "Test accuracy before GN-IVO" in printed
