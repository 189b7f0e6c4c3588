"""benchmarks/noise_controls.py: its cells and grid, the edge and anchor rules, the run queue and its claims, the
statistics of the verdict rule, on synthetic run records; one tiny real run per task (slow)."""

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks import noise_controls as nc
from benchmarks import protocol


def _record(cell, run, late: float, start: float = 0.3) -> dict:
    steps = cell.task.steps
    every = steps // 5 if run["split"] == "validation" else cell.task.test_every
    curve = [[s, late if s >= 0.8 * steps else start] for s in range(0, steps + 1, every)]
    return {
        **run,
        "key": run.key,
        "cell": cell.name,
        "accuracy": curve,
        "cpu_seconds": 60.0,
        "seconds_total": 70.0,
        "provenance": {"commit": "abc", "dirty": False, "torch": "t", "transformers": "tf", "trl": "trl"},
        "warm_start": {"weights_sha256": "w"},
    }


def _fill_tuning(cell, records: dict, score) -> None:
    """Record every pending validation run, repeatedly, with late accuracy ``score(method, rate)`` (extensions
    included), until the cell's tuning is final."""
    for _ in range(50):
        plan = nc.plan_cell(cell, records)
        pending = [r for r in plan.pending(records) if r["split"] == "validation"]
        if not pending:
            return
        for run in pending:
            records[run.key] = _record(cell, run, score(run["method"], run["overrides"]["learning_rate"]))
    raise AssertionError("tuning never became final")


def test_grid_cells_and_methods_are_the_preregistered_ones():
    assert [nc.grid_rate(i) for i in range(7)] == [5e-5, 7.07e-5, 1e-4, 1.41e-4, 2e-4, 2.83e-4, 4e-4]
    assert [nc.grid_rate(i) for i in (7, 8, 9, 10)] == [5.66e-4, 8e-4, 1.13e-3, 1.6e-3]
    assert nc.grid_rate(-4) == 1.25e-5 and nc.grid_rate(12) == 3.2e-3 and nc.grid_rate(14) == 6.4e-3
    assert list(nc.CELLS) == ["group-h8", "group-tool", "group-h4", "indep-h8", "indep-tool", "indep-h4"]
    assert nc.PRIMARY_CELLS == ["group-h8", "group-tool", "group-h4"]
    assert nc.BASE_METHODS == (
        "grpo",
        "grpo-kl0.01",
        "grpo-kl0.04",
        "grpo-kl0.1",
        "grpo-noscale",
        "rloo",
        "vimpo-b5e-2-c5e-3",
        "vimpo-b5e-4-adaptive",
    )
    assert protocol.METHODS["grpo-kl0.04"] == ("grpo", dict(protocol.GRPO_DEFAULTS, beta=0.04))
    assert protocol.METHODS["grpo-noscale"][1]["scale_rewards"] == "none"
    assert protocol.METHODS["grpo-noscale"][1]["beta"] == 0.0  # the std control is not an anchor
    assert protocol.METHODS[nc.VIMPO_PAPER][1]["vimpo_beta"] == 5e-4
    assert nc.TOOL_METHODS["rloo"] == ("grpo", protocol.RLOO_AS_GRPO)  # RLOOTrainer takes no tools
    group, indep = nc.CELLS["group-h8"], nc.CELLS["indep-h8"]
    assert group.run("grpo", 0, "validation", 2).key.endswith("-flips=group-noise=0.25")
    assert indep.run("grpo", 0, "validation", 2).key.endswith("learning_rate=0.0001-noise=0.25")
    assert len(nc.plan_cell(group, {}).pending({})) == 8 * 7 * 2  # 112 tuning runs, no test run before them
    assert len(nc.plan_cell(nc.CELLS["group-tool"], {}).pending({})) == 8 * 11 * 2


def test_tuning_extends_an_edge_choice_until_it_is_interior_or_at_a_bound():
    cell = nc.CELLS["group-h4"]
    records: dict = {}
    peak = {"grpo": 3.54e-5, "rloo": 2e-4, "grpo-noscale": 1e-5, nc.VIMPO: 8e-4}  # below, inside, below bound, above

    def score(method, rate):
        best = peak.get(method, 1e-4)
        return 0.6 - abs(math.log(rate / best))

    _fill_tuning(cell, records, score)
    plan = nc.plan_cell(cell, records)
    assert plan.final and plan.anchor is not None
    grpo = plan.tunings["grpo"]
    # 5e-5 chosen at the edge: 3.54e-5 added and chosen at the new edge: 2.5e-5 added; 3.54e-5 is then interior
    assert grpo.rate == 3.54e-5 and grpo.edges == [(0, "lower"), (-1, "lower")] and not grpo.at_bound
    assert plan.tunings["rloo"].rate == 2e-4 and plan.tunings["rloo"].edges == []
    floor = plan.tunings["grpo-noscale"]
    assert floor.rate == 1.25e-5 and floor.at_bound and [side for _, side in floor.edges] == ["lower"] * 5
    up = plan.tunings[nc.VIMPO]
    assert up.rate == 8e-4 and up.edges == [(6, "upper"), (7, "upper"), (8, "upper")] and up.grid[-1] == 9
    # every test run uses its method's final choice; none was possible before the tuning was final
    tests = [r for r in plan.pending(records) if r["split"] == "test"]
    assert len(tests) == len(plan.methods) * 10
    assert {r["overrides"]["learning_rate"] for r in tests if r["method"] == "grpo"} == {3.54e-5}


def test_ties_choose_the_smaller_rate():
    cell = nc.CELLS["group-h8"]
    records: dict = {}
    _fill_tuning(cell, records, lambda method, rate: 0.5 if rate >= 1e-4 else 0.4)
    assert nc.plan_cell(cell, records).tunings["grpo"].rate == 1e-4


@pytest.mark.parametrize(
    ("best_beta", "anchor", "betas"),
    [(0.04, "grpo-kl0.04", [0.01, 0.04, 0.1]), (0.25, "grpo-kl0.25", [0.01, 0.04, 0.1, 0.25, 0.625])],
)
def test_the_anchor_is_the_best_beta_on_validation_and_the_beta_grid_extends(best_beta, anchor, betas):
    cell = nc.CELLS["group-h8"]
    records: dict = {}

    def score(method, rate):
        inside = 0.5 - abs(math.log(rate / 1e-4)) / 10
        if method.startswith("grpo-kl"):
            return inside - abs(math.log(float(method[len("grpo-kl") :]) / best_beta)) / 10
        return inside

    _fill_tuning(cell, records, score)
    plan = nc.plan_cell(cell, records)
    assert plan.anchor == anchor and plan.anchor_betas == betas
    assert [m for m in plan.methods if m.startswith("grpo-kl")] == [protocol.anchored_grpo(b) for b in betas]


def test_the_queue_runs_grpo_family_before_vimpo_within_a_cell_and_can_hold_vimpo():
    records = {name: {} for name in nc.CELLS}
    runs = nc.queue(list(nc.CELLS.values()), records, hold_vimpo=False)
    first_cell = [run for cell, run in runs if cell.name == "group-h8"]
    kinds = [nc.is_vimpo(run["method"]) for run in first_cell]
    assert kinds == sorted(kinds) and kinds[0] is False and kinds[-1] is True
    assert [cell.name for cell, _ in runs][:1] == ["group-h8"]
    assert [c for c, _ in itertools.groupby(cell.name for cell, _ in runs)] == list(nc.CELLS)  # cell by cell
    held = nc.queue(list(nc.CELLS.values()), records, hold_vimpo=True)
    assert held and not any(nc.is_vimpo(run["method"]) for _, run in held)


def test_claims_are_exclusive_and_a_dead_process_claim_is_taken_over(tmp_path):
    cell = nc.CELLS["group-h4"]
    run = cell.run("grpo", 0, "validation", 0)
    first = nc.claim(tmp_path, cell, run, "a")
    assert first is not None and nc.claim(tmp_path, cell, run, "b") is None
    assert [c["worker"] for c in nc.live_claims(tmp_path)] == ["a"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    first.write_text(json.dumps({"pid": int(dead.stdout), "worker": "a", "since": "x"}))
    assert nc.live_claims(tmp_path) == []
    assert nc.claim(tmp_path, cell, run, "b") is not None


def test_workers_finish_the_study_from_the_records_alone(tmp_path, monkeypatch):
    """Two cells to the end with a fake trainer: tuning, edges, anchor, test runs; a second worker started on the
    finished records finds nothing to do, and a worker refuses to start from uncommitted code."""
    calls = []

    def fake_execute(cell, run, runs_dir, scratch, cache_dir):
        calls.append(run.key)
        rate = run["overrides"]["learning_rate"]
        late = 0.5 - abs(math.log(rate / (4e-4 if nc.is_vimpo(run["method"]) else 1e-4))) / 10
        late += 0.001 * run["seed"]
        record = _record(cell, run, late)
        nc._write_json(runs_dir / cell.name / f"{run.key}.json", record)
        return record

    monkeypatch.setattr(nc, "execute", fake_execute)
    monkeypatch.setattr(nc.reporting, "provenance", lambda: {"commit": "0" * 40, "dirty": False})
    args = Namespace(
        cells=["group-h4", "indep-h4"],
        runs_dir=str(tmp_path / "runs"),
        scratch=str(tmp_path / "scratch"),
        cache_dir=None,
        max_runs=None,
        poll=0.01,
        worker="0",
        allow_dirty=False,
    )
    trained = nc.work(args)
    records = nc.load_records(tmp_path / "runs")
    for name in args.cells:
        plan = nc.plan_cell(nc.CELLS[name], records[name])
        assert plan.final and not plan.pending(records[name])
        assert plan.tunings[nc.VIMPO].rate == 4e-4 and plan.tunings[nc.VIMPO].edges == [(6, "upper")]
        assert sum(r["split"] == "test" for r in records[name].values()) == len(plan.methods) * 10
    assert trained == len(calls) == sum(len(r) for r in records.values())
    assert nc.work(args) == 0  # resumes from the records: nothing left
    victim = next((tmp_path / "runs" / "indep-h4").glob("*.json"))
    victim.unlink()
    (tmp_path / "scratch" / "stop-0").touch()
    assert nc.work(args) == 0  # a stop file: no new run
    (tmp_path / "scratch" / "stop-0").unlink()
    assert nc.work(args) == 1 and victim.exists()  # the lost record is run again
    monkeypatch.setattr(nc.reporting, "provenance", lambda: {"commit": "0" * 40, "dirty": True})
    with pytest.raises(SystemExit, match="uncommitted"):
        nc.work(args)


# --------------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------------


def _t_density(x: float, df: int) -> float:
    return (
        math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + x * x / df) ** (-(df + 1) / 2)
    )


def _naive_t_p(t: float, df: int, steps: int = 20000) -> float:
    """Two-sided p by Simpson's rule on the density from 0 to |t|."""
    h = abs(t) / steps
    total = _t_density(0, df) + _t_density(abs(t), df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, steps))
    return 1 - 2 * total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 10])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.262, 4.0])
def test_t_p_value_matches_numerical_integration(t, df):
    assert nc.t_two_sided_p(t, df) == pytest.approx(_naive_t_p(t, df), abs=1e-7)
    assert nc.t_two_sided_p(-t, df) == nc.t_two_sided_p(t, df)


def test_t_p_value_at_the_tabulated_quantiles_is_five_percent():
    for df, quantile in protocol.T_975.items():
        assert nc.t_two_sided_p(quantile, df) == pytest.approx(0.05, abs=2e-4)


def _naive_signed_rank_p(differences: list[float]) -> float:
    values = [d for d in differences if d != 0]
    magnitudes = sorted(abs(v) for v in values)
    rank = {m: statistics.fmean(i + 1 for i, x in enumerate(magnitudes) if x == m) for m in magnitudes}
    ranks = [rank[abs(v)] for v in values]
    observed = sum(r for r, v in zip(ranks, values) if v > 0)
    centre = sum(ranks) / 2
    totals = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(values))]
    return sum(abs(t - centre) >= abs(observed - centre) - 1e-9 for t in totals) / len(totals)


@pytest.mark.parametrize(
    "differences",
    [
        [0.05, 0.06, 0.04, 0.05, 0.07, 0.02, 0.03, 0.08, 0.01, 0.09],
        [0.05, -0.06, 0.04, 0.05, -0.07, 0.02, 0.03, -0.08, 0.01, 0.09],
        [0.02, 0.02, -0.02, 0.04, 0.0, 0.04, -0.01, 0.03, 0.02, 0.0],  # ties and zeros
        [-0.1, -0.2, 0.05, -0.3, -0.01],
    ],
)
def test_signed_rank_p_is_the_exact_permutation_distribution(differences):
    p, zeros = nc.signed_rank_p(differences)
    assert zeros == sum(d == 0 for d in differences)
    assert p == pytest.approx(_naive_signed_rank_p(differences))


def test_signed_rank_p_known_values():
    assert nc.signed_rank_p([0.01 * (i + 1) for i in range(10)])[0] == pytest.approx(2 / 1024)  # every seed ahead
    assert nc.signed_rank_p([0.01, -0.01])[0] == 1.0
    assert math.isnan(nc.signed_rank_p([0.0, 0.0])[0])


def test_holm_adjustment():
    assert nc.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert nc.holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
    adjusted = nc.holm([0.2, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def _comparison(differences, label="x"):
    return nc.Comparison(label, "a", "b", "c", differences, list(range(10, 10 + len(differences))))


def test_verdict_rule_needs_both_adjusted_tests_and_uses_the_papers_gain():
    ahead = [0.05, 0.06, 0.04, 0.05, 0.07, 0.02, 0.03, 0.08, 0.01, 0.09]
    level = [0.001, -0.002, 0.0, 0.003, -0.001, 0.002, -0.003, 0.001, 0.0, -0.001]
    wide = [0.2, -0.15, 0.1, -0.05, 0.12, -0.2, 0.18, 0.0, -0.1, 0.05]
    family = nc.holm_family([_comparison(ahead), _comparison(level), _comparison(wide)])
    assert [c.verdict() for c in family] == [nc.REPRODUCED, nc.NOT_REPRODUCED, nc.INCONCLUSIVE]
    assert family[0].p_t_holm == pytest.approx(min(1, 3 * nc.paired_t_p(ahead)))  # the smallest p, times m
    assert nc.claim_verdict(family[:1]) == nc.REPRODUCED
    assert nc.claim_verdict(family) == nc.NOT_REPRODUCED
    assert nc.claim_verdict([family[0], family[2]]) == nc.INCONCLUSIVE
    # One large outlier: the t interval lies above 0 but the signed-rank test (6 of 10 ahead) does not reject.
    outlier = nc.holm_family([_comparison([0.5, 0.01, 0.02, -0.01, 0.015, -0.02, 0.01, -0.005, 0.02, -0.015])])[0]
    assert outlier.p_rank_holm > 0.05 and outlier.verdict() != nc.REPRODUCED
    assert nc.holm_family([_comparison(ahead[:4])])[0].verdict() == nc.INCONCLUSIVE  # too few pairs
    # Holm over three: a comparison significant alone can fail in the family.
    alone = nc.holm_family([_comparison([0.03, 0.01, 0.02, -0.01, 0.04, 0.02, 0.0, 0.03, 0.01, 0.02])])[0]
    together = nc.holm_family(
        [
            _comparison([0.03, 0.01, 0.02, -0.01, 0.04, 0.02, 0.0, 0.03, 0.01, 0.02]),
            _comparison(wide),
            _comparison(wide),
        ]
    )[0]
    assert alone.p_t_holm < together.p_t_holm


def test_an_incomplete_family_adjusts_with_the_full_m_and_only_upward():
    """Holm over the pre-registered family before every comparison is complete: the missing ones count with p = 1
    (m stays the family's size), a partial comparison gets no adjusted value and no verdict, and an adjusted value
    shown early is never below the final one."""
    modest = [0.09, -0.03, 0.06, 0.03, 0.12, 0.06, -0.06, 0.09, 0.03, 0.06]  # t p 0.030, signed-rank p 0.047
    ahead = [0.05, 0.06, 0.04, 0.05, 0.07, 0.02, 0.03, 0.08, 0.01, 0.09]
    early = nc.holm_family([_comparison(modest), _comparison(ahead[:6]), _comparison([])])
    assert early[0].p_t_holm == pytest.approx(min(1, 3 * nc.paired_t_p(modest)))
    assert math.isnan(early[1].p_t_holm) and not math.isnan(early[1].p_t)  # progress shown, not adjusted
    assert nc.shown_verdict(early[1]) == "not decided yet (6 of 10 seeds)"
    assert early[0].verdict() == nc.INCONCLUSIVE
    assert nc.shown_verdict(early[0]) == f"{nc.INCONCLUSIVE} so far (2 of the family open)"
    final = nc.holm_family([_comparison(modest), _comparison(ahead), _comparison(ahead)])
    assert final[0].p_t_holm <= early[0].p_t_holm and final[0].p_rank_holm <= early[0].p_rank_holm
    assert nc.shown_verdict(final[0]) == nc.REPRODUCED  # last in Holm's order: its own p, below 0.05
    assert nc.method_or_anchor(early[0], early[0]) == "undecided so far"


def test_a_verdict_no_later_cell_can_change_is_shown_before_the_family_is_complete():
    """ "not reproduced" rests on the unadjusted interval, and an "inconclusive" whose own p-values are not both below
    alpha can never become "reproduced" (an adjusted p-value is never below its own): both are final while the family
    is still open, and one final "not reproduced" decides the claim (it needs every cell reproduced)."""
    level = [0.001, -0.002, 0.0, 0.003, -0.001, 0.002, -0.003, 0.001, 0.0, -0.001]
    wide = [0.2, -0.15, 0.1, -0.05, 0.12, -0.2, 0.18, 0.0, -0.1, 0.05]
    modest = [0.09, -0.03, 0.06, 0.03, 0.12, 0.06, -0.06, 0.09, 0.03, 0.06]  # t p 0.030, signed-rank p 0.047
    ahead = [0.05, 0.06, 0.04, 0.05, 0.07, 0.02, 0.03, 0.08, 0.01, 0.09]
    early = nc.holm_family([_comparison(level), _comparison(wide), _comparison(modest), _comparison(ahead[:6])])
    assert [c.verdict() for c in early[:3]] == [nc.NOT_REPRODUCED, nc.INCONCLUSIVE, nc.INCONCLUSIVE]
    assert [c.final() for c in early] == [True, True, False, False]
    assert nc.shown_verdict(early[1]) == nc.INCONCLUSIVE
    assert nc.shown_verdict(early[2]) == f"{nc.INCONCLUSIVE} so far (1 of the family open)"
    assert nc.shown_claim_verdict(early) == nc.NOT_REPRODUCED
    assert "decided before every cell is in" in nc.claim_verdict_note(early)
    # Whatever the open comparison ends with, the rule gives the same claim-level verdict.
    for rest in (ahead, level, wide):
        final = nc.holm_family([_comparison(level), _comparison(wide), _comparison(modest), _comparison(rest)])
        assert nc.claim_verdict(final) == nc.NOT_REPRODUCED and nc.claim_verdict_note(final) == ""
    undecided = nc.holm_family([_comparison(wide), _comparison(ahead[:6])])
    assert nc.shown_claim_verdict(undecided) == "not decided yet" and nc.claim_verdict_note(undecided) == ""
    reproduced = nc.holm_family([_comparison(ahead)])[0]
    assert nc.method_or_anchor(reproduced, early[1]) == "undecided"  # B can no longer become reproduced
    assert nc.method_or_anchor(reproduced, early[2]) == "undecided so far"


def test_method_or_anchor():
    reproduced, not_reproduced, inconclusive = (
        nc.holm_family([_comparison(d)])[0]
        for d in (
            [0.05, 0.06, 0.04, 0.05, 0.07, 0.02, 0.03, 0.08, 0.01, 0.09],
            [0.001, -0.002, 0.0, 0.003, -0.001, 0.002, -0.003, 0.001, 0.0, -0.001],
            [0.2, -0.15, 0.1, -0.05, 0.12, -0.2, 0.18, 0.0, -0.1, 0.05],
        )
    )
    assert nc.method_or_anchor(reproduced, reproduced) == "the method"
    assert nc.method_or_anchor(reproduced, not_reproduced) == "the anchor"
    assert nc.method_or_anchor(not_reproduced, inconclusive) == "no gain to explain"
    assert nc.method_or_anchor(reproduced, inconclusive) == "undecided"


# --------------------------------------------------------------------------------------------------------------------
# One tiny real run per task
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cell_name", ["group-h4", "group-tool"])
def test_one_tiny_run_writes_its_record(cell_name, tmp_path, monkeypatch):
    from benchmarks import agent_learning
    from gnivo_trl.agent_task import ToolWarmStartConfig
    from gnivo_trl.synthetic import WarmStartConfig, generate_problems

    cell = nc.CELLS[cell_name]
    tiny_task = nc.Task(cell.task.name, cell.task.horizon, 2, cell.task.grid, cell.task.bounds, 1)
    cell = nc.Cell(cell.name, tiny_task, cell.flips, cell.condition)
    tiny_synthetic = WarmStartConfig(
        num_steps=2, num_examples=64, epochs=1.0, batch_size=16, hidden_size=16, intermediate_size=32
    )
    monkeypatch.setattr(protocol, "warm_start_config", lambda horizon, task=None: tiny_synthetic)
    monkeypatch.setattr(
        nc,
        "task_args",
        lambda cell, split: Namespace(
            **{**vars(protocol.protocol(4, 1)), "steps": 2, "num_steps": 2, "train_problems": 64}
        ),
    )
    monkeypatch.setattr(nc, "eval_problems", lambda cell, split: generate_problems(4, "test", 2, seed=0))
    monkeypatch.setattr(
        agent_learning,
        "WARM_START",
        ToolWarmStartConfig(
            num_steps=2,
            num_examples=96,
            epochs=1.0,
            batch_size=16,
            hidden_size=16,
            intermediate_size=32,
            eval_problems=8,
        ),
    )
    monkeypatch.setattr(agent_learning, "STEPS", 2)
    run = cell.run("grpo-kl0.04", 10, "test", 2)
    record = nc.execute(cell, run, tmp_path / "runs", tmp_path / "scratch", str(tmp_path / "cache"))
    saved = json.loads((tmp_path / "runs" / cell.name / f"{run.key}.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert [step for step, _ in saved["accuracy"]] == [0, 1, 2]
    assert len(saved["train_reward"]) == 2 and saved["reward_noise"]["mode"] == "group"
    assert saved["reward_noise"]["scored"] == 2 * 64 and saved["reward_noise"]["groups"] == 2 * 8
    assert saved["provenance"]["trl"] and saved["warm_start"]["weights_sha256"]
    assert saved["cpu_seconds"] > 0 and not (tmp_path / "scratch" / "trainers" / run.key).exists()
    assert os.path.getsize(tmp_path / "runs" / cell.name / f"{run.key}.json") < 4000


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def _study(tmp_path: Path, cells: list[str], late) -> Path:
    """Records of every run of ``cells``: the tuning peaks at 1e-4 for every method (at 4e-4 for VIMPO: one upper
    edge), the anchor is beta 0.04; test late accuracy ``late(cell, method, seed)``."""
    runs_dir = tmp_path / "runs"
    for name in cells:
        cell = nc.CELLS[name]
        records: dict = {}

        def score(method, rate):
            value = 0.5 - abs(math.log(rate / (4e-4 if nc.is_vimpo(method) else 1e-4))) / 10
            return value + (0.01 if method == "grpo-kl0.04" else 0.0)

        _fill_tuning(cell, records, score)
        plan = nc.plan_cell(cell, records)
        for run in plan.test_runs():
            records[run.key] = _record(cell, run, late(name, run["method"], run["seed"]))
        for key, record in records.items():
            nc._write_json(runs_dir / name / f"{key}.json", record)
    return runs_dir


def test_reports_state_the_answer_the_verdicts_every_seed_and_the_edges(tmp_path):
    def late(cell, method, seed):
        base = 0.4 + 0.01 * (seed - 10)
        if method == nc.VIMPO:
            return base + (0.1 if cell != "group-h4" else 0.0) + 0.002 * (seed % 3 - 1)  # ahead in two cells
        if method == "grpo-kl0.04":
            return base + (
                0.1 - 0.002 * (seed % 3 - 1) if cell == "group-tool" else 0.0
            )  # closes the gap on the tool task
        return base

    runs_dir = _study(tmp_path, ["group-h8", "group-tool", "group-h4"], late)
    written = nc.write_reports(runs_dir, tmp_path / "results")
    assert {p.name for p in written} == {"group-h8.md", "group-tool.md", "group-h4.md", "noise_controls.md"}
    summary = (tmp_path / "results" / "noise_controls.md").read_text()
    assert "Provenance: runs produced at package commit abc" in summary
    primary = [line for line in summary.splitlines() if "VIMPO − strongest anchored GRPO (vimpo-b5e-2-c5e-3" in line]
    assert len(primary) == 6  # the primary table, then the same rows among every comparison
    primary = primary[:3]
    h8 = next(line for line in primary if line.startswith("| `group-h8`"))
    assert "+10.0 [" in h8 and "10 of 10" in h8 and h8.endswith(f"| {nc.REPRODUCED} |")
    h4 = next(line for line in primary if line.startswith("| `group-h4`"))
    assert h4.endswith(f"| {nc.NOT_REPRODUCED} |")  # +0.2 pp: a gain of 3.7 pp excluded
    assert "Claim-level verdict: **not reproduced**" in summary
    assert "8-step problems: **the method**" in summary and "4-step problems: **no gain to explain**" in summary
    assert "the tool task: **the anchor**" in summary
    assert "vimpo-b5e-2-c5e-3: chosen at the upper edge, 0.0004; extended to 0.000566 (final choice 0.0004)" in summary
    assert "| `indep-h8` |" in summary  # the cells not run yet are listed with their progress
    cell = (tmp_path / "results" / "group-h8.md").read_text()
    assert "Strongest anchored GRPO (chosen on validation): **grpo-kl0.04**" in cell
    seed_rows = [line for line in cell.splitlines() if line.startswith("| 1") and line.count("|") == 10]
    assert len(seed_rows) == 10 and seed_rows[0].startswith("| 10 | 40.0 |")
    assert (tmp_path / "results" / "curves_group-h8.png").exists()
    assert (tmp_path / "results" / "late_accuracy.png").exists()


def test_reports_from_partial_records_say_what_is_missing(tmp_path):
    cell = nc.CELLS["group-h8"]
    run = cell.run("grpo", 0, "validation", 0)
    nc._write_json(tmp_path / "runs" / cell.name / f"{run.key}.json", _record(cell, run, 0.3))
    nc.write_reports(tmp_path / "runs", tmp_path / "results")
    summary = (tmp_path / "results" / "noise_controls.md").read_text()
    assert "Claim-level verdict: **not decided yet**" in summary
    assert "| `group-h8` | tuning 1/112 runs so far, test 0/80 runs |" in summary
    assert "](reproduction.md)" not in summary and not (tmp_path / "results" / "reproduction.md").exists()


def test_a_comparison_gets_its_verdict_only_with_every_test_seed(tmp_path):
    """Six of ten test seeds far ahead: the rows show the interval so far and no verdict (the rule decides on the
    pre-registered ten pairs, not on the seeds that finished first)."""
    runs_dir = _study(tmp_path, ["group-h8"], lambda cell, method, seed: 0.4 + (0.2 if method == nc.VIMPO else 0.0))
    for path in (runs_dir / "group-h8").glob("*-test-*.json"):
        if json.loads(path.read_text())["seed"] >= 16:
            path.unlink()
    nc.write_reports(runs_dir, tmp_path / "results")
    summary = (tmp_path / "results" / "noise_controls.md").read_text()
    primary = next(line for line in summary.splitlines() if line.startswith("| `group-h8` | VIMPO − strongest"))
    assert "+20.0 [+20.0, +20.0], n = 6" in primary and primary.endswith("| not decided yet (6 of 10 seeds) |")
    rows = [line for line in summary.splitlines() if line.startswith("| `group-h8` |") and " − " in line]
    verdicts = (nc.REPRODUCED, nc.NOT_REPRODUCED, nc.INCONCLUSIVE)
    assert len(rows) > 10 and not [line for line in rows if any(f"{v} |" in line for v in verdicts)]
    assert "Claim-level verdict: **not decided yet**" in summary


def test_welch_interval_and_t_quantile():
    for df, quantile in protocol.T_975.items():
        assert nc.t_quantile(df) == pytest.approx(quantile, abs=1e-3)
    a = [60.0, 62.0, 58.0, 61.0, 59.0]
    mean, low, high = nc.welch_interval(a, 57.0, 3.0, 5)
    va, vb = statistics.variance(a) / 5, 9 / 5
    df = (va + vb) ** 2 / (va**2 / 4 + vb**2 / 4)  # 6.9: rounded down to 6
    half = protocol.T_975[math.floor(df)] * math.sqrt(va + vb)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-3)


def test_reproduction_runs_are_the_archived_cells_and_come_after_the_study(tmp_path):
    items = nc.REPRODUCTIONS
    assert list(items) == ["repro-clean-h4", "repro-noise0.4-h4", "repro-clean-h8", "repro-agents-clean"]
    assert len(items["repro-clean-h4"].runs()) == 8 * 5 and len(items["repro-agents-clean"].runs()) == 5 * 5
    noisy = items["repro-noise0.4-h4"].runs()[0]
    assert noisy.key.endswith("-noise=0.4") and noisy["overrides"]["learning_rate"] == 1e-4  # archived key form
    every = [*nc.CELLS.values(), *(item.cell for item in items.values())]
    runs = nc.queue(every, {cell.name: {} for cell in every}, hold_vimpo=False)
    names = [cell.name for cell, _ in runs]
    assert names.index("repro-clean-h4") > max(i for i, n in enumerate(names) if n in nc.CELLS)
    # The report: published mean/std against the new runs; the agents' per-seed values paired by seed.
    runs_dir = tmp_path / "runs"
    for name, item in items.items():
        for run in item.runs():
            rate, published = item.archived[run["method"]]
            if len(published) == 2:
                value = published[0] / 100 + 0.002 * (run["seed"] - 12)
            else:
                value = published[run["seed"] - 10] / 100 + (0.05 if run["method"] == "vimpo" else 0.0)
            nc._write_json(runs_dir / name / f"{run.key}.json", _record(item.cell, run, value, start=0.3))
    text, used = nc.reproduction_report(nc.load_records(runs_dir))
    assert len(used) == sum(len(item.runs()) for item in items.values())
    grpo = next(line for line in text.splitlines() if line.startswith("| grpo | 0.0002 | 60.7 ± 2.5 | 60.7 ±"))
    assert grpo.endswith("| yes |")
    # every new run's score by seed, from the records (60.7 + 0.2 per seed above 12)
    assert "| 10: 60.3, 11: 60.5, 12: 60.7, 13: 60.9, 14: 61.1 |" in grpo
    vimpo = next(line for line in text.splitlines() if line.startswith("| vimpo | 0.0016 |"))
    assert "| +5.0 [+5.0, +5.0] | **no** |" in vimpo  # 5 points above on every seed: paired, and not within noise
