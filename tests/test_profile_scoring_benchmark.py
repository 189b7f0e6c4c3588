"""benchmarks/profile_scoring.py profiles a step phase at a tiny length and appends labelled sections."""

import pytest

from benchmarks import profile_scoring


@pytest.mark.slow
def test_profile_scoring_appends_a_labelled_table_per_method(tmp_path):
    output = tmp_path / "scoring_profile.md"
    argv = ["--length", "16", "--repeats", "1", "--top", "4", "--methods", "grpo+ref", "vimpo/exact"]
    assert profile_scoring.main([*argv, "--label", "first", "--output", str(output)]) == 0
    assert profile_scoring.main([*argv, "--label", "second", "--output", str(output)]) == 0
    report = output.read_text()
    assert report.count("# Step phase profile") == 1  # the header is written once, runs are appended
    assert report.index("### first") < report.index("### second")
    assert report.count("#### `vimpo/exact`, T=16, loss phase") == 2
    assert report.count("#### `grpo+ref`, T=16, loss phase") == 2
    operator_rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert len(operator_rows) == 4 * 4  # --top rows per method and run
    # VIMPO's loss step runs both models and TRL's kernels; the profile must see that work.
    vimpo_section = report.split("#### `vimpo/exact`, T=16, loss phase")[1].split("####")[0]
    assert "aten::" in vimpo_section
