"""Sampling-based metrics for maths benchmarks: pass@k (unbiased estimator), avg@n, and their report formats.

For a problem with `n` sampled completions of which `c` are correct, the unbiased estimator of pass@k
(Chen et al., 2021, "Evaluating Large Language Models Trained on Code") is

    pass@k = 1 - C(n - c, k) / C(n, k),

the probability that a random subset of `k` of the `n` samples contains at least one correct one; avg@n is the
mean accuracy `c / n` (so pass@1 estimated from `n` samples equals avg@n). Benchmark scores are the means of the
per-problem values. Problems without a usable gold answer (the reward function returned `None`) are excluded
and counted separately.

Examples:
    ```python
    from gnivo_trl.evaluation import pass_at_k, summarize_benchmark

    print(pass_at_k(num_samples=4, num_correct=1, k=2))  # 0.5
    summary = summarize_benchmark([[True, False], [False, False]], ks=(1, 2))
    print(summary["pass@2"])  # 0.5
    ```
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["format_markdown_table", "pass_at_k", "score_samples", "summarize_benchmark"]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimate `1 - C(n - c, k) / C(n, k)` for one problem.

    Computed as `1 - prod_{i = n - c + 1}^{n} (1 - k / i)`, which is exact in exact arithmetic and stable for large
    `n` (no huge binomials).

    Args:
        num_samples: `n`, the completions sampled for the problem.
        num_correct: `c`, how many of them are correct (`0 <= c <= n`).
        k: The `k` of pass@k (`1 <= k <= n`).

    Raises:
        ValueError: `k` outside `[1, n]` or `c` outside `[0, n]`.
    """
    if num_samples < 1 or not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={num_samples}")
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={num_correct}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))


def summarize_benchmark(
    correct: Sequence[Sequence[bool | float | None]], ks: Iterable[int] = (1,)
) -> dict[str, float | int]:
    """Benchmark-level metrics from per-problem, per-sample correctness.

    Args:
        correct: One sequence per problem, one entry per sampled completion: truthy when correct, `None` when the
            problem's gold answer is unusable (the whole problem is then excluded). Every scored problem must have
            the same number of samples `n`.
        ks: The `k` values of pass@k to report (each `<= n`).

    Returns:
        `{"num_problems", "num_skipped", "num_samples", "avg@n", "pass@k" for each k}`, where `avg@n` is
        literally keyed with the value of n (e.g. `"avg@4"`). Scores are in [0, 1]; with no scored problem they
        are NaN.
    """
    scored = [row for row in correct if len(row) and all(value is not None for value in row)]
    skipped = len(correct) - len(scored)
    sizes = {len(row) for row in scored}
    if len(sizes) > 1:
        raise ValueError(f"every problem needs the same number of samples, got sizes {sorted(sizes)}")
    n = sizes.pop() if sizes else 0
    summary: dict[str, float | int] = {"num_problems": len(scored), "num_skipped": skipped, "num_samples": n}
    ks = sorted(set(ks))
    if not scored:
        summary["avg@0"] = float("nan")
        summary.update({f"pass@{k}": float("nan") for k in ks})
        return summary
    counts = [sum(bool(value) for value in row) for row in scored]
    summary[f"avg@{n}"] = sum(c / n for c in counts) / len(counts)
    for k in ks:
        summary[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
    return summary


def format_markdown_table(results: Mapping[str, Mapping[str, Any]], percent: bool = True) -> str:
    """A Markdown table with one row per benchmark and one column per metric (`avg@n`, `pass@k`, problems).

    Args:
        results: `{benchmark: summarize_benchmark(...)}`.
        percent: Show scores as percentages with one decimal (else as fractions with three decimals).
    """
    metric_names: list[str] = []
    for summary in results.values():
        for name in summary:
            if (name.startswith("avg@") or name.startswith("pass@")) and name not in metric_names:
                metric_names.append(name)
    metric_names.sort(key=lambda name: (not name.startswith("pass@"), int(name.split("@")[1])))
    header = ["benchmark", *metric_names, "problems"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for benchmark, summary in results.items():
        cells = [benchmark]
        for name in metric_names:
            value = summary.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("-")
            else:
                cells.append(f"{100 * value:.1f}" if percent else f"{value:.3f}")
        cells.append(str(summary.get("num_problems", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def score_samples(
    completions: Sequence[Sequence[Any]], solutions: Sequence[Any], reward_func: Any = None
) -> list[list[float | None]]:
    """Grade `completions[p][j]` (sample `j` of problem `p`) against `solutions[p]`.

    Args:
        completions: Per problem, its sampled completions (strings or chat messages).
        solutions: Per problem, the gold answer.
        reward_func: A TRL-style reward function `f(completions, solution) -> list[float | None]`; defaults to
            [`gnivo_trl.rewards.math_accuracy_reward`][gnivo_trl.rewards.math_accuracy_reward]. All samples are graded
            in one call.

    Returns:
        Per problem, per sample: 1.0 / 0.0, or `None` where the gold answer is unusable.
    """
    if reward_func is None:
        from .rewards import math_accuracy_reward as reward_func
    if len(completions) != len(solutions):
        raise ValueError(f"got {len(completions)} problems but {len(solutions)} solutions")
    flat_completions = [c for samples in completions for c in samples]
    flat_solutions = [gold for samples, gold in zip(completions, solutions, strict=True) for _ in samples]
    flat_rewards = reward_func(flat_completions, solution=flat_solutions) if flat_completions else []
    scores: list[list[float | None]] = []
    start = 0
    for samples in completions:
        scores.append(list(flat_rewards[start : start + len(samples)]))
        start += len(samples)
    return scores
