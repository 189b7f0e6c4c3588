"""benchmarks/protocol.py and benchmarks/reporting.py: reward noise, run keys and conditions, the rate choice, the
provenance line of every results file. Offline and fast (no training: that is the studies' smoke tests)."""

import json
import math
import re
import statistics
import subprocess
from pathlib import Path

import pytest

from benchmarks import protocol, reporting


class _State:
    def __init__(self, step: int) -> None:
        self.global_step = step


def test_noisy_reward_follows_the_condition_and_passes_the_columns_to_the_exact_reward():
    from gnivo_trl.rewards import NoisyReward
    from gnivo_trl.synthetic import chain_reward, solution_text

    assert protocol.noisy_reward(chain_reward, {}, 0, 8) is None  # exact rewards
    independent = protocol.noisy_reward(chain_reward, {"noise": 0.25}, 10, 8)
    assert isinstance(independent, NoisyReward) and independent.mode == "independent"  # the paper-claims model
    assert (independent.flip_probability, independent.seed, independent.num_generations) == (0.25, 10, 8)
    group = protocol.noisy_reward(chain_reward, {"noise": 0.25, "flips": "group"}, 10, 4)
    assert group.mode == "group" and group.num_generations == 4
    exact = protocol.noisy_reward(chain_reward, {"noise": 1e-12}, 0, 2)
    rewards = exact([solution_text("3+4*2"), "wrong"], problem=["3+4*2", "3+4*2"], trainer_state=_State(0))
    assert rewards == [1.0, 0.0] and exact.__name__ == "chain_reward"


def test_run_keys_keep_the_plain_protocol_and_name_each_condition():
    plain = protocol.make_run(4, "grpo", 0, "validation", learning_rate=2e-4)
    assert plain.key == "h4-grpo-seed0-validation-learning_rate=0.0002"  # the fair comparison's keys, unchanged
    assert protocol.make_run(4, "grpo", 0, "validation", {"k": 8}, learning_rate=2e-4).key == plain.key
    assert protocol.make_run(4, "grpo", 0, "validation", {"noise": 0.0}, learning_rate=2e-4).key == plain.key
    noisy = protocol.make_run(4, "grpo", 0, "validation", {"noise": 0.25, "k": 2}, learning_rate=2e-4)
    assert noisy.key == plain.key + "-k=2-noise=0.25"
    with pytest.raises(ValueError, match="unknown condition"):
        protocol.make_run(4, "grpo", 0, "test", {"temperature": 2})
    # The noise model: independent flips are the default and keep the paper-claims keys; group flips are named.
    independent = protocol.make_run(4, "grpo", 0, "test", {"noise": 0.25, "flips": "independent"}, learning_rate=1e-4)
    assert independent.key == protocol.make_run(4, "grpo", 0, "test", {"noise": 0.25}, learning_rate=1e-4).key
    group = protocol.make_run(4, "grpo", 0, "test", {"noise": 0.25, "flips": "group"}, learning_rate=1e-4)
    assert group.key.endswith("-flips=group-noise=0.25") and group["condition"]["flips"] == "group"
    with pytest.raises(ValueError, match="flips"):
        protocol.make_run(4, "grpo", 0, "test", {"noise": 0.25, "flips": "row"})
    with pytest.raises(ValueError, match="without noise"):
        protocol.make_run(4, "grpo", 0, "test", {"flips": "group"})


def test_protocol_under_conditions():
    plain = protocol.protocol(4, 10)
    assert (plain.steps, plain.prompts_per_step, plain.num_generations) == (100, 8, 8)
    for k in (2, 4, 16):
        args = protocol.protocol(4, 10, {"k": k})
        assert args.num_generations == k and args.prompts_per_step * k == protocol.COMPLETIONS_PER_STEP
    with pytest.raises(ValueError, match="divide"):
        protocol.protocol(4, 10, {"k": 3})
    assert protocol.protocol(4, 10, {"task": "weak"}).steps == protocol.TASKS["weak"]["steps"]
    weak = protocol.warm_start_config(4, "weak")
    assert weak.error_rate == protocol.TASKS["weak"]["error_rate"] != protocol.warm_start_config(4).error_rate
    assert protocol.warm_start_config(8).num_hidden_layers == 4
    assert protocol.warm_start_config(8).epochs == 2 * protocol.warm_start_config(4).epochs == 8.0


def test_rloo_settings_are_valid_for_trls_trainer_and_grpo_form():
    from trl import GRPOConfig, RLOOConfig

    family, settings = protocol.METHODS["rloo"]
    assert family == "rloo" and settings["beta"] == 0.0
    config = RLOOConfig(output_dir="/tmp/unused", use_cpu=True, **settings)
    assert config.num_generations >= 2 and config.beta == 0.0
    grpo_form = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, **protocol.RLOO_AS_GRPO)
    assert grpo_form.scale_rewards == "none" and grpo_form.loss_type == "dr_grpo"


def test_late_accuracy_is_the_last_fifth_of_training():
    assert protocol.late_accuracy({"accuracy": [[0, 0.1], [70, 0.5], [80, 0.6], [90, 0.7], [100, 0.8]]}) == (
        pytest.approx(0.7)
    )
    assert protocol.late_accuracy({"accuracy": [[0, 0.1], [150, 0.2], [160, 0.4], [200, 0.6]]}) == pytest.approx(0.5)


def test_choose_rate_prefers_the_best_mean_then_the_smaller_rate(tmp_path):
    grid = {
        rate: [protocol.make_run(4, "grpo", s, "validation", learning_rate=rate) for s in (0, 1)]
        for rate in (1e-4, 2e-4)
    }
    results = {}
    with pytest.raises(SystemExit, match="incomplete"):
        protocol.choose_rate(results, grid, "test")
    for runs in grid.values():
        for run in runs:
            results[run.key] = {"accuracy": [[0, 0.2], [100, 0.5]]}
    assert protocol.choose_rate(results, grid, "test") == 1e-4
    results[grid[2e-4][0].key] = {"accuracy": [[0, 0.2], [100, 0.6]]}
    assert protocol.choose_rate(results, grid, "test") == 2e-4


def test_paired_ci_is_student_t():
    differences = [0.01, 0.03, -0.02, 0.05, 0.00]
    mean, low, high = protocol.paired_ci(differences)
    half = 2.776 * statistics.stdev(differences) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((statistics.fmean(differences), mean - half, mean + half))
    assert protocol.paired_cell([0.1]) == "–"


def test_provenance_names_the_commit_and_the_library_versions(tmp_path):
    record = reporting.provenance()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=reporting.REPO_ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert record["commit"] == head.stdout.strip()
    import torch
    import transformers
    import trl

    assert (record["torch"], record["transformers"], record["trl"]) == (
        torch.__version__,
        transformers.__version__,
        trl.__version__,
    )
    path = reporting.write_report(tmp_path / "r.md", "# Title\n\nBody.\n")
    lines = path.read_text().splitlines()
    assert lines[0] == "# Title" and lines[2].startswith("Provenance: package commit ") and lines[4] == "Body."
    assert f"TRL {trl.__version__}" in lines[2] and f"torch {torch.__version__}" in lines[2]
    runs = [{"provenance": {**record, "commit": "a" * 40, "dirty": False}}] * 2 + [{}]
    line = reporting.provenance_line(runs)
    assert "aaaaaaaaaa (torch" in line and ": 2 runs" in line and "(not recorded): 1 run" in line


def test_results_dir_refuses_unknown_studies(tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "RESULTS", tmp_path)
    assert reporting.results_dir("credit") == tmp_path / "credit" and (tmp_path / "credit").is_dir()
    with pytest.raises(ValueError, match="unknown study"):
        reporting.results_dir("nope")


def test_png_metadata_carries_the_provenance(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(tmp_path / "p.png", metadata=reporting.png_metadata())
    plt.close(fig)
    assert Image.open(tmp_path / "p.png").text["Description"].startswith("Provenance:")
    json.dumps(reporting.provenance())  # serialisable into each run's cache file
    assert Path(reporting.RESULTS).name == "results"


def test_every_results_file_records_its_provenance():
    """Every Markdown results file, current or archived, has a provenance line; every archived file says first what
    replaced it."""
    results = reporting.RESULTS
    files = sorted(results.rglob("*.md"))
    assert files
    for path in files:
        assert path.parent == reporting.ARCHIVE or path.parent.name in reporting.STUDIES, path
        text = path.read_text()
        assert re.search(r"^(<!-- )?Provenance", text, re.MULTILINE), path
        if path.parent == reporting.ARCHIVE:
            assert text.splitlines()[0].startswith("Superseded by "), path
    assert not list(results.glob("*.md")) and not list(results.glob("*.png"))  # nothing outside a study's folder


def test_reports_embed_only_existing_links():
    """Every relative link in a results file or benchmarks/README.md points at a file that exists."""
    import re

    sources = [*reporting.RESULTS.rglob("*.md"), reporting.BENCHMARKS / "README.md"]
    for source in sources:
        for target in re.findall(r"\]\(([^)#\s]+)\)", source.read_text()):
            if "://" in target:
                continue
            assert (source.parent / target).exists(), f"{source}: {target}"
