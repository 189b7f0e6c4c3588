"""benchmarks/fair_comparison.py: its split, its statistics, its rate choice and its reports, on synthetic cached runs
(training itself is benchmarks/learning.py's ``run_one``, exercised by the credit and learning smoke tests)."""

import json
import math
import statistics
from pathlib import Path

import pytest

from benchmarks import fair_comparison
from gnivo_trl.synthetic import generate_problems, is_test_problem  # noqa: E402


def test_validation_problems_are_disjoint_from_test_rl_prompts_and_sft_data():
    validation = fair_comparison.validation_problems(4, count=200)
    assert len(validation) == len(set(validation)) == 200
    assert not any(is_test_problem(problem) for problem in validation)
    config = fair_comparison.warm_start_config(4)
    used = set(generate_problems(4096, "train", 4, seed=0))
    used |= set(generate_problems(config.num_examples, "train", 4, seed=1000 + config.seed))
    assert not used & set(validation)


def test_paired_interval_is_student_t():
    differences = [0.01, 0.03, -0.02, 0.05, 0.00]
    mean, low, high = fair_comparison.paired_ci(differences)
    half = 2.776 * statistics.stdev(differences) / math.sqrt(5)
    assert mean == pytest.approx(statistics.fmean(differences))
    assert (low, high) == pytest.approx((mean - half, mean + half))
    assert math.isnan(fair_comparison.paired_ci([0.1])[1])


def _fake_result(run, final: float, steps=(0, 20, 100), metrics=None) -> dict:
    curve = [[step, 0.25 + (final - 0.25) * step / steps[-1]] for step in steps]
    return {
        **run,
        "key": run.key,
        "accuracy": curve,
        "seconds_total": 30.0,
        "seconds_training": 25.0,
        "metrics": metrics or {},
    }


def _write(work: Path, result: dict) -> None:
    (work / f"{result['key']}.json").write_text(json.dumps(result))


def test_rate_choice_takes_the_best_validation_mean_and_refuses_an_incomplete_grid(tmp_path):
    runs = fair_comparison.tuning_runs(4)
    with pytest.raises(SystemExit, match="incomplete"):
        fair_comparison.chosen_rates(4, tmp_path)
    best = {method: rate for method, rate in zip(fair_comparison.METHODS, [1e-4, 2e-4, 4e-4, 8e-4, 2e-4, 4e-4])}
    for run in runs:
        rate = run["overrides"]["learning_rate"]
        _write(tmp_path, _fake_result(run, 0.7 if rate == best[run["method"]] else 0.5))
    assert fair_comparison.chosen_rates(4, tmp_path) == best
    # A tie goes to the smaller rate.
    for run in runs:
        if run["method"] == "grpo" and run["overrides"]["learning_rate"] == 8e-4:
            _write(tmp_path, _fake_result(run, 0.7))
    assert fair_comparison.chosen_rates(4, tmp_path)["grpo"] == 1e-4


def test_reports_are_written_from_cached_runs(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(fair_comparison, "RESULTS", results)
    for run in fair_comparison.tuning_runs(4):
        _write(tmp_path, _fake_result(run, 0.6 if run["overrides"]["learning_rate"] == 2e-4 else 0.5))
    for run in fair_comparison.test_runs(4, tmp_path):
        final = 0.6 + 0.01 * (run["seed"] - 10) + (0.02 if run["method"] == "gnivo-step" else 0.0)
        _write(tmp_path, _fake_result(run, final, steps=(0, 10, 80, 90, 100)))
    metrics = {
        "vimpo/actor_coeff": [1e-3],
        "vimpo/actor_logit_grad_rms_unscaled": [2.0],
        "vimpo/value_logit_grad_rms": [0.5],
    }
    for run in fair_comparison.map_runs():
        if run["horizon"] == 4:
            _write(tmp_path, _fake_result(run, 0.6, metrics=metrics))
    fair_comparison.write_reports(tmp_path)
    headline = (results / "learning.md").read_text()
    step_row = next(line for line in headline.splitlines() if line.startswith("| gnivo-step |"))
    assert "| +2.0 |" in step_row  # paired by seed: exactly the constant offset, with a zero-width interval
    assert "[+2.0, +2.0]" in step_row
    assert "Not run yet" in headline  # the 8-step part
    assert (results / "learning_h4.png").exists() and (results / "learning_vimpo_map.png").exists()
    vimpo_map = (results / "learning_vimpo_map.md").read_text()
    assert "| 4 | 0.0005 | 0.016 |" in vimpo_map and "| 1.00e-03 | 4 |" in vimpo_map  # unscaled ratio 2.0 / 0.5
    assert "| gnivo-step |" in (results / "learning_tuning.md").read_text()
