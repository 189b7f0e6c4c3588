"""benchmarks/paper_claims.py: its cells, the rate choice per condition, the verdict rule and the reports, on
synthetic cached runs (training itself is benchmarks/protocol.py's ``run_one``, run by the studies' smoke tests)."""

import json
from pathlib import Path

import pytest

from benchmarks import paper_claims, protocol


def _result(run, late: float, start: float = 0.3, steps: int = 100, metrics=None, noise=None) -> dict:
    evaluations = [0, *range(10, steps + 1, 10)] if run["split"] == "test" else [0, steps // 5, steps]
    curve = [[s, start + (late - start) * s / steps] for s in evaluations]
    for point in curve:
        if point[0] >= 0.8 * steps:
            point[1] = late  # a flat late window: late accuracy is exactly `late`
    result = {**run, "key": run.key, "accuracy": curve, "seconds_total": 36.0, "metrics": metrics or {}}
    if noise is not None:
        result["reward_noise"] = {"flip_rate": noise}
    return result


def _write(work: Path, result: dict) -> None:
    (work / f"{result['key']}.json").write_text(json.dumps(result))


def _fill(cell, work: Path, best_rate: dict, late: dict) -> None:
    """Tuning: the method's ``best_rate`` wins; test: ``late[method](seed)``."""
    for run in cell.tuning_runs():
        rate = run["overrides"]["learning_rate"]
        _write(work, _result(run, 0.6 if rate == best_rate.get(run["method"], 2e-4) else 0.5))
    for run in cell.test_runs(work):
        noise = cell.condition.get("noise")
        _write(
            work, _result(run, late[run["method"]](run["seed"]), metrics={"frac_reward_zero_std": [0.5]}, noise=noise)
        )


def test_cells_cover_the_four_claims_in_priority_order():
    names = list(paper_claims.CELLS)
    assert names[:5] == ["clean-h4", "noise0.25-h4", "k2", "k4", "k16"]  # claims 1 and 2 first
    assert {"noise0.1-h4", "noise0.4-h4", "clean-h8", "noise0.25-h8", "weak"} <= set(names)
    for cell in paper_claims.CELLS.values():
        assert cell.methods[:2] == ("grpo", "rloo")  # every condition compares with GRPO and has RLOO
        assert len(cell.tuning_runs()) == 2 * len(paper_claims.LEARNING_RATES[cell.horizon]) * len(cell.methods)
    assert paper_claims.k_cell(8) is paper_claims.CELLS["clean-h4"]
    assert paper_claims.noise_cell(8, 0.25).condition == {"noise": 0.25}
    assert paper_claims.CELLS["k2"].tuning_runs()[0].key.endswith("-k=2")


def test_each_condition_chooses_its_own_rate(tmp_path):
    clean, noisy = paper_claims.CELLS["clean-h4"], paper_claims.CELLS["noise0.25-h4"]
    with pytest.raises(SystemExit, match="incomplete"):
        noisy.chosen_rates(tmp_path)
    for run in clean.tuning_runs():
        _write(tmp_path, _result(run, 0.6 if run["overrides"]["learning_rate"] == 2e-4 else 0.5))
    for run in noisy.tuning_runs():
        _write(tmp_path, _result(run, 0.6 if run["overrides"]["learning_rate"] == 4e-4 else 0.5))
    assert set(clean.chosen_rates(tmp_path).values()) == {2e-4}
    assert set(noisy.chosen_rates(tmp_path).values()) == {4e-4}
    assert {r["overrides"]["learning_rate"] for r in noisy.test_runs(tmp_path)} == {4e-4}
    assert all(r["condition"] == {"noise": 0.25} for r in noisy.test_runs(tmp_path))


@pytest.mark.parametrize(
    ("differences", "gain", "expected"),
    [
        ([0.05, 0.06, 0.04, 0.05, 0.05], 3.7, paper_claims.REPRODUCED),
        ([0.0, 0.01, -0.01, 0.005, -0.005], 3.7, paper_claims.NOT_REPRODUCED),  # +3.7 pp excluded
        ([0.08, -0.06, 0.05, -0.04, 0.02], 3.7, paper_claims.INCONCLUSIVE),  # contains 0 and +3.7 pp
        ([0.05], 3.7, paper_claims.INCONCLUSIVE),
    ],
)
def test_verdict_rule(differences, gain, expected):
    assert paper_claims.verdict(differences, gain)[0] == expected


def test_claim_verdict_needs_every_primary_comparison():
    yes = paper_claims.Comparison("a", [0.05, 0.06, 0.05], 3.7, primary=True)
    no = paper_claims.Comparison("b", [0.0, 0.001, -0.001], 3.7, primary=True)
    unsure = paper_claims.Comparison("c", [0.1, -0.1, 0.05], 3.7, primary=True)
    secondary_no = paper_claims.Comparison("d", [0.0, 0.001, -0.001], 3.7)
    assert paper_claims.claim_verdict([yes, secondary_no]) == paper_claims.REPRODUCED
    assert paper_claims.claim_verdict([yes, unsure]) == paper_claims.INCONCLUSIVE
    assert paper_claims.claim_verdict([yes, no, unsure]) == paper_claims.NOT_REPRODUCED


def test_reports_pair_by_seed_and_state_the_verdicts(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(paper_claims, "RESULTS", results)
    work = tmp_path / "work"
    work.mkdir()

    def offset(value):
        return lambda seed: 0.6 + 0.01 * (seed - 10) + value

    for name in ("clean-h4", "noise0.25-h4", "k4"):
        cell = paper_claims.CELLS[name]
        late = {m: offset(0.0) for m in cell.methods}
        if name == "noise0.25-h4":
            late = {m: offset(-0.1) for m in cell.methods}
            late[paper_claims.VIMPO_FIXED] = offset(-0.05)  # 5 pp over GRPO on every seed
        if name == "k4":
            late["gnivo-token"] = offset(0.0)  # exactly GRPO: +0.0 [+0.0, +0.0], below +6.7 pp
        _fill(cell, work, {}, late)
    paper_claims.write_reports(work, cache_dir=str(tmp_path / "no-cache"))
    noise = (results / "noise.md").read_text()
    row = next(line for line in noise.splitlines() if line.startswith(f"| {paper_claims.VIMPO_FIXED} | 0.0002 | 5 |"))
    assert "| +5.0 [+5.0, +5.0] |" in row  # paired by seed: the constant offset, a zero-width interval
    drop = next(line for line in noise.splitlines() if line.startswith("| grpo | 62.0 ± 1.6 | 52.0 ± 1.6 |"))
    assert drop.endswith("| +10.0 [+10.0, +10.0] |")  # clean − noisy, paired by seed
    assert "realised flip rate over its test runs 25.00%" in noise
    summary = (results / "paper_claims.md").read_text()
    assert summary.startswith("# The papers' own claims")
    assert "Provenance: runs produced at package commit" in summary
    claim_rows = [line for line in summary.splitlines() if line.startswith("| 1. ") or line.startswith("| 2. ")]
    assert "**inconclusive**" in claim_rows[0]  # the 8-step half of claim 1 has not run
    assert "**not reproduced**" in claim_rows[1] and "+0.0 pp [+0.0, +0.0]" in claim_rows[1]
    assert "`k2`: 0/65 runs" in summary
    for name in ("noise.png", "group_size.png", "weak_warm_start.md", "rloo.md", "tuning.md"):
        assert (results / name).exists(), name
    tuning = (results / "tuning.md").read_text()
    assert "**60.0 (60.0, 60.0)**" in tuning
    # A hand-written reading below the tables survives a rerun.
    (results / "paper_claims.md").write_text(summary + "\n## Reading\n\nHand-written.\n")
    paper_claims.write_reports(work, cache_dir=str(tmp_path / "no-cache"))
    assert (results / "paper_claims.md").read_text().endswith("## Reading\n\nHand-written.\n")


def test_plan_counts_every_run(tmp_path):
    lines = paper_claims.plan(tmp_path)
    assert (
        lines[-1]
        == f"total: {sum(len(c.tuning_runs()) + 5 * len(c.methods) for c in paper_claims.CELLS.values())} runs"
    )


@pytest.mark.slow
def test_new_methods_and_conditions_train_end_to_end(tmp_path, monkeypatch):
    """RLOO (TRL's RLOOTrainer) with noisy rewards at K=4, and VIMPO's adaptive actor at K=2, through the cached
    ``execute`` (tiny warm start, 2 steps): curves, realised flip counts, provenance, cache reuse."""
    from gnivo_trl.synthetic import WarmStartConfig

    tiny = WarmStartConfig(num_examples=64, epochs=1.0, batch_size=16, hidden_size=16, intermediate_size=32)
    monkeypatch.setattr(protocol, "warm_start_config", lambda horizon, task=None: tiny)
    monkeypatch.setitem(protocol.HORIZONS, 4, dict(num_steps=4, max_completion_length=16))
    monkeypatch.setitem(protocol.PRESETS, "cpu", {**protocol.PRESETS["cpu"], "steps": 2})
    monkeypatch.setattr(protocol, "EVAL_PROBLEMS", 8)
    monkeypatch.setattr(protocol, "validation_problems", lambda horizon: ["1+2-3*4+5"] * 8)
    rloo = protocol.make_run(4, "rloo", 0, "test", {"noise": 0.5, "k": 4}, learning_rate=1e-4)
    vimpo = protocol.make_run(4, "vimpo-b5e-2-adaptive", 0, "validation", {"k": 2}, learning_rate=1e-4)
    for run in (rloo, vimpo):
        result = protocol.execute(run, tmp_path, str(tmp_path / "cache"))
        assert [step for step, _ in result["accuracy"]] == [0, 1, 2]  # every max(steps // 10, 1) steps
        assert len(result["train_reward"]) == 2 and result["provenance"]["trl"]
        assert (tmp_path / f"{run.key}.json").exists()
    noise = json.loads((tmp_path / f"{rloo.key}.json").read_text())["reward_noise"]
    assert noise["scored"] == 2 * 64 and 0 < noise["flipped"] < noise["scored"]
    assert "vimpo/actor_coeff" in json.loads((tmp_path / f"{vimpo.key}.json").read_text())["metrics"]
    assert protocol.execute(rloo, tmp_path, None)["key"] == rloo.key  # cached: no training, no warm start needed
