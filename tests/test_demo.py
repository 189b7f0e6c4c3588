"""``make demo`` (``python -m gnivo_trl.demo``) runs end to end offline: warm start, GN-IVO, report, plot, model."""

import json

import pytest

from gnivo_trl.demo import main, reward_sparkline


def test_reward_sparkline_maps_zero_to_one_onto_bars():
    assert reward_sparkline([0.0, 0.5, 1.0]) == " ▄█"
    assert reward_sparkline([-1.0, 2.0]) == " █"  # clipped to the range
    assert reward_sparkline([]) == ""


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
