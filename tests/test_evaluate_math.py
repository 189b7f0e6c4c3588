"""pass@k estimator against brute-force enumeration, and examples/evaluate_math.py end to end (offline)."""

from __future__ import annotations  # noqa: I001

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gnivo_trl.evaluation import format_markdown_table, pass_at_k, score_samples, summarize_benchmark

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "datasets"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_form_and_special_cases():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the mean accuracy
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(200, 7, 100) == pytest.approx(1 - math.comb(193, 100) / math.comb(200, 100))  # large n
    for n, c, k in [(3, 1, 0), (3, 1, 4), (3, 4, 1), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_summarize_benchmark_averages_problems_and_skips_unusable_gold():
    correct = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [None, None, None]]
    summary = summarize_benchmark(correct, ks=(1, 2, 3))
    assert summary["num_problems"] == 3 and summary["num_skipped"] == 1 and summary["num_samples"] == 3
    assert summary["avg@3"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert summary["pass@1"] == pytest.approx(summary["avg@3"])
    assert summary["pass@2"] == pytest.approx((pass_at_k(3, 1, 2) + 0 + 1) / 3)
    assert summary["pass@3"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same number of samples"):
        summarize_benchmark([[1.0], [1.0, 0.0]])
    table = format_markdown_table({"demo": summary})
    assert table.splitlines()[0] == "| benchmark | pass@1 | pass@2 | pass@3 | avg@3 | problems |"
    assert "| demo | 44.4 | 55.6 | 66.7 | 44.4 | 3 |" in table


def test_score_samples_keeps_problem_structure():
    completions = [[r"\boxed{7}", r"\boxed{8}"], [r"so \boxed{\frac{1}{2}}"]]
    assert score_samples(completions, ["7", "0.5"]) == [[1.0, 0.0], [1.0]]


def test_evaluate_benchmark_grades_a_stub_generator_exactly():
    """With a generator whose first sample is right and second wrong, avg@2 = pass@1 = 0.5 and pass@2 = 1."""
    from gnivo_trl.data import load_math_dataset
    from gnivo_trl.testing import build_tiny_tokenizer

    evaluate_math = load_example("evaluate_math")
    dataset = load_math_dataset("aime24", str(FIXTURES / "aime24.jsonl"))
    gold_by_prompt = {}
    tokenizer = build_tiny_tokenizer()
    for prompt, gold in zip(evaluate_math.render_prompts(tokenizer, dataset["prompt"]), dataset["solution"]):
        gold_by_prompt[prompt] = gold

    def generate(prompts, k):
        assert k == 2
        return [[f"The answer is \\boxed{{{gold_by_prompt[p]}}}.", "\\boxed{-12345}"] for p in prompts]

    summary, records = evaluate_math.evaluate_benchmark("aime24", dataset, tokenizer, generate, k=2, ks=[1, 2])
    assert summary["num_problems"] == len(dataset) == 3
    assert (summary["avg@2"], summary["pass@1"], summary["pass@2"]) == (0.5, 0.5, 1.0)
    assert [r["scores"] for r in records] == [[1.0, 0.0]] * 3


def test_evaluate_math_script_offline(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    command = [
        sys.executable,
        str(ROOT / "examples" / "evaluate_math.py"),
        "--model_name_or_path",
        tiny_model_dir,
        "--benchmarks",
        f"math500={FIXTURES / 'math500.parquet'}",
        f"aime24={FIXTURES / 'aime24.jsonl'}",
        "--k",
        "2",
        "--max_problems",
        "2",
        "--max_new_tokens",
        "8",
        "--backend",
        "transformers",
        "--save_completions",
        "--output_dir",
        str(out),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets-cache")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["k"] == 2 and report["settings"]["backend"] == "transformers"
    assert list(report["results"]) == ["math500", "aime24"]
    for summary in report["results"].values():
        assert summary["num_problems"] == 2 and summary["num_samples"] == 2 and summary["num_skipped"] == 0
        for metric in ("avg@2", "pass@1", "pass@2"):
            assert 0.0 <= summary[metric] <= 1.0
        assert summary["pass@1"] <= summary["pass@2"]
    markdown = (out / "results.md").read_text()
    assert "| benchmark | pass@1 | pass@2 | avg@2 | problems |" in markdown
    assert "| math500 |" in markdown and "| aime24 |" in markdown
    lines = (out / "completions_aime24.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(len(json.loads(line)["completions"]) == 2 for line in lines)
