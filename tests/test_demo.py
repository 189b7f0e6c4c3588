"""``make demo`` (``python -m gnivo_trl.demo``) runs end to end offline and the reward rises."""

import json

import pytest

from gnivo_trl.demo import main, sevens_reward


def test_sevens_reward_is_the_share_of_sevens():
    assert sevens_reward(["777", "a7", ""]) == [1.0, 0.5, 0.0]
    assert sevens_reward([[{"role": "assistant", "content": "7x"}]]) == [0.5]


@pytest.mark.slow
def test_demo_runs_and_the_reward_rises(tmp_path, capsys):
    summary = main(["--output-dir", str(tmp_path), "--steps", "40"])
    assert summary["mean_reward_last_steps"] > summary["mean_reward_first_steps"]
    assert (tmp_path / "model" / "config.json").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40
    assert "Mean reward over the first" in capsys.readouterr().out
