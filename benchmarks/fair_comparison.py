"""Does it learn better? GRPO, GN-IVO and VIMPO compared fairly: each method tuned on validation, two horizons.

The learning study (``benchmarks/learning.py``) compared every method at one learning rate chosen on GRPO alone, on
4-step problems. This study keeps the shared training protocol exactly (``benchmarks/protocol.py``: same warm start,
prompts, K, optimizer, steps, evaluation sampler) and changes what that study was criticised for:

* **Fair tuning.** Every method gets the same learning-rate grid per horizon (``LEARNING_RATES``: a factor of 8 at 4
  steps, 4 at 8 steps), runs on tuning seeds 0 and 1, and is scored on a *validation* split: train-split problems
  that are neither in the RL prompts nor in the warm start's SFT data, and never test problems (the test split is a
  hash of the problem text). The rate with the best mean final validation accuracy is chosen per method (ties: the
  smaller rate). Then 5 fresh seeds (``TEST_SEEDS``) per method at its chosen rate are evaluated on the held-out test
  problems.
* **Two horizons.** 4-step problems (answers of 32 tokens with the end-of-sequence token) and 8-step problems (60
  tokens, 1.9x), each with its own warm start (the same SFT recipe on that task; 4 layers instead of 2 at 8 steps,
  see ``protocol.warm_start_config``).
* **VIMPO's beta and response length** (``vimpo-map``): ``vimpo_beta`` in {5e-4, 5e-3, 5e-2} x the two horizons x the
  actor off, at the paper's weight 5e-3, and the official adaptive weight (``vimpo_adaptive_actor_coeff``, alpha
  0.025, the authors' run script), at the former shared rate 2e-4, 2 seeds, on validation.
* **GN-IVO's alpha** (``gnivo-alpha``): ``gnivo_alpha`` in {0.05, 0.2, 1.0} for token and step units at each unit's
  chosen rate, test seeds 10-12.

Methods (settings of ``protocol.METHODS``): ``grpo`` (TRL's defaults written out), ``gnivo-token``, ``gnivo-step``,
``gnivo-sequence`` (alpha 0.2), ``vimpo-b5e-2-c0`` (value only) and ``vimpo-b5e-2-c5e-3`` (with the paper's actor
weight), beta 5e-2 being the paper's 5e-4 scaled to 32-token answers (see ``benchmarks/protocol.py``).

The study's one command runs every part in order, in two processes (one per core; about 3.5 CPU-hours)::

    make fair-comparison-benchmark

Every run is cached in ``--work-dir`` (default ``.cache/fair-comparison``) so a part resumes where it stopped, and
``--shard i/n`` lets n processes share a part. The parts, from the repository root::

    python -m benchmarks.fair_comparison tune --horizon 4      # 48 runs
    python -m benchmarks.fair_comparison tune --horizon 8      # 36 runs
    python -m benchmarks.fair_comparison test --horizon 4      # 30 runs (needs tune --horizon 4)
    python -m benchmarks.fair_comparison test --horizon 8      # 30 runs
    python -m benchmarks.fair_comparison vimpo-map             # 28 runs (8 more are tuning runs)
    python -m benchmarks.fair_comparison gnivo-alpha           # 12 runs (needs tune and test --horizon 4)
    python -m benchmarks.fair_comparison all                   # all of the above in order (--wait between them)
    python -m benchmarks.fair_comparison report                # markdown and plots from whatever is cached

The reports go to ``benchmarks/results/fair_comparison/``: ``learning.md`` (headline: test accuracy at each method's
tuned rate), ``learning_tuning.md``, ``learning_vimpo_map.md`` and ``learning_gnivo_alpha.md``, with PNG plots beside
them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from benchmarks import protocol, reporting
from benchmarks.protocol import (  # noqa: F401  (validation_problems, warm_start_config: this study's split and warm starts)
    EVAL_PROBLEMS,
    HORIZONS,
    TEST_SEEDS,
    TUNING_SEEDS,
    Run,
    cached,
    choose_rate,
    final_accuracy,
    late_accuracy,
    make_run,
    mean_std,
    paired_ci,
    pct,
    run_all,
    seconds,
    validation_problems,
    warm_start_config,
)

STUDY = "fair_comparison"
RESULTS = reporting.RESULTS / STUDY

METHODS = ["grpo", "gnivo-token", "gnivo-step", "gnivo-sequence", "vimpo-b5e-2-c0", "vimpo-b5e-2-c5e-3"]
# The same grid for every method at a horizon. At 4 steps it first was 1e-4..4e-4; GN-IVO's token and step units
# chose its top edge, so 8e-4 was added for every method after that first pass (no test result informed it).
LEARNING_RATES = {4: [1e-4, 2e-4, 4e-4, 8e-4], 8: [1e-4, 2e-4, 4e-4]}

MAP_LEARNING_RATE = 2e-4  # the learning study's shared rate: the map is about beta and length, not the rate
MAP_BETAS = [5e-4, 5e-3, 5e-2]
MAP_ACTORS = {
    "off": dict(vimpo_actor_coeff=0.0),
    "fixed 5e-3": dict(vimpo_actor_coeff=5e-3),
    "adaptive": dict(vimpo_adaptive_actor_coeff=True, vimpo_adaptive_actor_alpha=0.025),
}
ALPHA_METHODS = ["gnivo-step", "gnivo-token"]
ALPHAS = [0.05, 0.2, 1.0]
ALPHA_SEEDS = TEST_SEEDS[:3]  # 3 of the test seeds, to fit the part into a session (alpha 0.2: the test runs)


# --------------------------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------------------------


def tuning_runs(horizon: int) -> list[Run]:
    return [
        make_run(horizon, method, seed, "validation", learning_rate=rate)
        for seed in TUNING_SEEDS
        for rate in LEARNING_RATES[horizon]
        for method in METHODS
    ]


def chosen_rates(horizon: int, work: Path) -> dict[str, float]:
    """Per method, the grid rate with the best mean final validation accuracy over the tuning seeds (ties: the
    smaller rate). Refuses to choose from an incomplete grid."""
    results = {r["key"]: r for r in cached(tuning_runs(horizon), work)}
    return {
        method: choose_rate(
            results,
            {
                rate: [make_run(horizon, method, seed, "validation", learning_rate=rate) for seed in TUNING_SEEDS]
                for rate in LEARNING_RATES[horizon]
            },
            f"horizon {horizon}, {method}",
        )
        for method in METHODS
    }


def test_runs(horizon: int, work: Path) -> list[Run]:
    rates = chosen_rates(horizon, work)
    return [
        make_run(horizon, method, seed, "test", learning_rate=rates[method])
        for seed in TEST_SEEDS
        for method in METHODS
    ]


def map_run(horizon: int, seed: int, beta: float, actor: dict) -> Run:
    """One cell's run. Beta 5e-2 with the actor off or fixed is a method of the tuning grid at the map's rate: that
    run itself (the same configuration), not a copy."""
    if beta == 5e-2 and set(actor) == {"vimpo_actor_coeff"}:
        method = "vimpo-b5e-2-c0" if actor["vimpo_actor_coeff"] == 0.0 else "vimpo-b5e-2-c5e-3"
        return make_run(horizon, method, seed, "validation", learning_rate=MAP_LEARNING_RATE)
    return make_run(
        horizon, "vimpo-b5e-2-c0", seed, "validation", learning_rate=MAP_LEARNING_RATE, vimpo_beta=beta, **actor
    )


def map_runs() -> list[Run]:
    """The map's runs, the 4-step row first, the value-only reference at 8 steps last (the most expensive and the
    least needed)."""
    runs = [
        map_run(horizon, seed, beta, actor)
        for horizon in HORIZONS
        for seed in TUNING_SEEDS
        for beta in MAP_BETAS
        for actor in MAP_ACTORS.values()
    ]
    return sorted(runs, key=lambda run: run["horizon"] == 8 and run["overrides"].get("vimpo_actor_coeff") == 0.0)


def alpha_runs(work: Path, horizon: int = 4) -> list[Run]:
    rates = chosen_rates(horizon, work)
    runs = []
    for seed in ALPHA_SEEDS:
        for method in ALPHA_METHODS:
            for alpha in ALPHAS:
                overrides = dict(learning_rate=rates[method])
                if alpha != 0.2:  # 0.2 is the method's own setting: the test part's run
                    overrides["gnivo_alpha"] = alpha
                runs.append(make_run(horizon, method, seed, "test", **overrides))
    return runs


# --------------------------------------------------------------------------------------------------------------------
# Statistics and reports
# --------------------------------------------------------------------------------------------------------------------


def curve(results: list[dict]) -> tuple[list[int], list[float], list[float]]:
    steps = [step for step, _ in results[0]["accuracy"]]
    values = [[dict(r["accuracy"])[step] for r in results] for step in steps]
    return steps, [statistics.fmean(v) for v in values], [mean_std(v)[1] for v in values]


def report_test(work: Path) -> list[str]:
    """The headline: test accuracy of every method at its tuned rate, per horizon."""
    lines = [
        "# Does it learn better? Each method tuned on validation, two horizons",
        "",
        f"Generated by `python -m benchmarks.fair_comparison` on {time.strftime('%Y-%m-%d')} from the runs cached in its "
        "work directory; commands in the script's docstring (`tune`, then `test`, per horizon; then `report`).",
        "",
        "- Task: chained arithmetic mod 10 (`gnivo_trl.synthetic`), exact verifier; 4-step problems (answers of 32 "
        "tokens with EOS, max 48) and 8-step problems (60 tokens, max 96), each from its own warm start (the same SFT "
        "recipe: 24,000 noisy solutions, per-step error rate 0.2).",
        "- RL: the shared protocol (`benchmarks/protocol.py`): 100 optimizer steps of 8 prompts x K=8, AdamW, constant rate, "
        "max_grad_norm 1.0, temperature 1.",
        f"- Tuning: rates {LEARNING_RATES[4]} (4 steps) and {LEARNING_RATES[8]} (8 steps) for every method, seeds "
        f"{', '.join(map(str, TUNING_SEEDS))}, final accuracy on {EVAL_PROBLEMS} validation problems (train-split "
        "problems in neither the RL prompts nor the SFT data); the best mean is chosen (`learning_tuning.md`).",
        f"- Test: seeds {', '.join(map(str, TEST_SEEDS))} (not used in tuning) at each method's chosen rate; "
        f"{EVAL_PROBLEMS} held-out test problems, one sample each at temperature 1, every 10 steps, the same problems "
        "and sampling seed at every evaluation. Paired differences to GRPO are paired by seed (same prompts in the "
        "same order); 95% intervals are Student t over the seeds. 'Mean of steps 80-100' averages the last three "
        "evaluations of each run (less noisy than the final one alone).",
        "",
    ]
    for horizon in HORIZONS:
        try:
            runs = test_runs(horizon, work)
        except SystemExit as missing:
            lines += [f"## {horizon}-step problems", "", f"Not run yet ({missing}).", ""]
            continue
        rates = chosen_rates(horizon, work)
        results = cached(runs, work)
        by_method = {m: [r for r in results if r["method"] == m] for m in METHODS}
        lines += [f"## {horizon}-step problems", ""]
        if not by_method["grpo"]:
            lines += ["GRPO's test runs are not cached yet.", ""]
            continue
        grpo_final = statistics.fmean(final_accuracy(r) for r in by_method["grpo"])
        grpo_by_seed = {r["seed"]: final_accuracy(r) for r in by_method["grpo"]}
        lines += [
            "| method | chosen rate | seeds | step 0 | final test accuracy (%) | final − GRPO, paired (pp) | 95% CI (pp) "
            "| mean of steps 80-100 (%) | its − GRPO, paired (pp) [95% CI] | steps to GRPO's final | CPU time (min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            method_results = by_method[method]
            if not method_results:
                continue
            finals = [final_accuracy(r) for r in method_results]
            mean, std = mean_std(finals)
            steps, means, _ = curve(method_results)
            reached = next((str(s) for s, m in zip(steps, means) if m >= grpo_final - 1e-12), "not reached")
            difference, interval = "–", "–"
            if method != "grpo":
                diffs = [
                    final_accuracy(r) - grpo_by_seed[r["seed"]] for r in method_results if r["seed"] in grpo_by_seed
                ]
                if diffs:
                    d, low, high = paired_ci(diffs)
                    difference = f"{100 * d:+.1f}"
                    interval = f"[{100 * low:+.1f}, {100 * high:+.1f}]" if not math.isnan(low) else "–"
            late = [late_accuracy(r) for r in method_results]
            late_mean, late_std = mean_std(late)
            late_difference = "–"
            if method != "grpo":
                grpo_late = {r["seed"]: late_accuracy(r) for r in by_method["grpo"]}
                diffs = [late_accuracy(r) - grpo_late[r["seed"]] for r in method_results if r["seed"] in grpo_late]
                if len(diffs) > 1:
                    d, low, high = paired_ci(diffs)
                    late_difference = f"{100 * d:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
            lines.append(
                f"| {method} | {rates[method]:g} | {len(method_results)} | {pct(method_results[0]['accuracy'][0][1])} "
                f"| {pct(mean)} ± {pct(std)} | {difference} | {interval} | {pct(late_mean)} ± {pct(late_std)} "
                f"| {late_difference} | {reached} | {seconds(method_results) / 60:.1f} |"
            )
        lines += ["", "Per-seed final test accuracy (%):", ""]
        for method in METHODS:
            per_seed = ", ".join(
                f"{r['seed']}: {pct(final_accuracy(r))}" for r in sorted(by_method[method], key=lambda r: r["seed"])
            )
            lines.append(f"- {method}: {per_seed}")
        plot_path = RESULTS / f"learning_h{horizon}.png"
        protocol.plot_curves(
            by_method, plot_path, f"{horizon}-step problems, test accuracy at each method's tuned rate"
        )
        lines += ["", f"![{horizon}-step learning curves]({plot_path.name})", ""]
        lines += [f"CPU time of this part: {seconds(results) / 60:.0f} min (sum over runs, evaluation included).", ""]
    return lines


def report_tuning(work: Path) -> list[str]:
    lines = [
        "# Learning-rate tuning on the validation split",
        "",
        f"Generated by `python -m benchmarks.fair_comparison` on {time.strftime('%Y-%m-%d')}. Command per horizon: "
        "`python -m benchmarks.fair_comparison tune --horizon H`. Final accuracy (%) on "
        f"{EVAL_PROBLEMS} validation problems after 100 steps, mean over seeds {TUNING_SEEDS} (each seed in "
        "parentheses); the chosen rate is in bold.",
        "",
    ]
    for horizon in HORIZONS:
        results = {r["key"]: r for r in cached(tuning_runs(horizon), work)}
        try:
            rates = chosen_rates(horizon, work)
        except SystemExit:
            rates = {}
        lines += [
            f"## {horizon}-step problems",
            "",
            "| method | " + " | ".join(f"lr {r:g}" for r in LEARNING_RATES[horizon]) + " |",
        ]
        lines.append("|---|" + "---|" * len(LEARNING_RATES[horizon]))
        for method in METHODS:
            cells = []
            for rate in LEARNING_RATES[horizon]:
                finals = [
                    final_accuracy(results[key])
                    for key in (
                        make_run(horizon, method, seed, "validation", learning_rate=rate).key for seed in TUNING_SEEDS
                    )
                    if key in results
                ]
                if not finals:
                    cells.append("–")
                    continue
                cell = f"{pct(statistics.fmean(finals))} ({', '.join(pct(f) for f in finals)})"
                cells.append(f"**{cell}**" if rates.get(method) == rate else cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", f"CPU time: {seconds(list(results.values())) / 60:.0f} min for {len(results)} runs.", ""]
    return lines


def run_metric(result: dict, name: str) -> float:
    """Mean of a logged training metric over the run (NaN when it was not logged)."""
    values = [v for v in result.get("metrics", {}).get(name, []) if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def report_map(work: Path) -> list[str]:
    results = {r["key"]: r for r in cached(map_runs(), work)}
    lines = [
        "# VIMPO: where training collapses, by beta, response length and actor weight",
        "",
        f"Generated by `python -m benchmarks.fair_comparison vimpo-map` on {time.strftime('%Y-%m-%d')}. VIMPO at learning "
        f"rate {MAP_LEARNING_RATE:g} (the learning study's shared rate), 100 steps, seeds {TUNING_SEEDS}, final accuracy (%) "
        f"on {EVAL_PROBLEMS} validation problems (warm start in the first column). Actor: off "
        "(`vimpo_actor_coeff=0`), the paper's fixed weight 5e-3, or the official adaptive weight "
        "(`vimpo_adaptive_actor_coeff=True`, alpha 0.025). `beta x L` is beta times the mean answer length in tokens "
        "(32 and 60).",
        "",
        "| horizon | beta | beta x L | warm start | actor off | fixed 5e-3 | adaptive | adaptive: mean actor weight | "
        "adaptive: actor/value logit-grad RMS, unscaled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lengths = {4: 32, 8: 60}
    for horizon in HORIZONS:
        for beta in MAP_BETAS:
            cells, start = [], "–"
            adaptive_weight, ratio = "–", "–"
            for label, actor in MAP_ACTORS.items():
                keys = [map_run(horizon, seed, beta, actor).key for seed in TUNING_SEEDS]
                found = [results[key] for key in keys if key in results]
                if not found:
                    cells.append("–")
                    continue
                start = pct(found[0]["accuracy"][0][1])
                finals = [final_accuracy(r) for r in found]
                cells.append(f"{pct(statistics.fmean(finals))} ({', '.join(pct(f) for f in finals)})")
                if label == "adaptive":
                    adaptive_weight = f"{statistics.fmean(run_metric(r, 'vimpo/actor_coeff') for r in found):.2e}"
                    unscaled = statistics.fmean(
                        run_metric(r, "vimpo/actor_logit_grad_rms_unscaled")
                        / run_metric(r, "vimpo/value_logit_grad_rms")
                        for r in found
                    )
                    ratio = f"{unscaled:.3g}"
            lines.append(
                f"| {horizon} | {beta:g} | {beta * lengths[horizon]:.3g} | {start} | "
                + " | ".join(cells)
                + f" | {adaptive_weight} | {ratio} |"
            )
    lines += ["", f"CPU time: {seconds(list(results.values())) / 60:.0f} min for {len(results)} runs.", ""]
    plot_map(results)
    lines += ["![beta by length map](learning_vimpo_map.png)", ""]
    return lines


def plot_map(results: dict[str, dict]) -> None:
    """Final validation accuracy by (horizon, beta) for each actor setting, as heat maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MAP_ACTORS), figsize=(4 * len(MAP_ACTORS), 3.2), sharey=True)
    for ax, (label, actor) in zip(axes, MAP_ACTORS.items()):
        grid = []
        for horizon in HORIZONS:
            row = []
            for beta in MAP_BETAS:
                keys = [map_run(horizon, seed, beta, actor).key for seed in TUNING_SEEDS]
                finals = [final_accuracy(results[k]) for k in keys if k in results]
                row.append(100 * statistics.fmean(finals) if finals else math.nan)
            grid.append(row)
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, "–" if math.isnan(value) else f"{value:.0f}", ha="center", va="center", color="white")
        ax.set_xticks(range(len(MAP_BETAS)), [f"{b:g}" for b in MAP_BETAS])
        ax.set_yticks(range(len(HORIZONS)), [f"{h} steps" for h in HORIZONS])
        ax.set_xlabel("vimpo_beta")
        ax.set_title(f"actor {label}")
    fig.colorbar(image, ax=axes, label="final validation accuracy (%)")
    fig.savefig(
        RESULTS / "learning_vimpo_map.png",
        dpi=120,
        bbox_inches="tight",
        metadata=reporting.png_metadata(list(results.values())),
    )
    plt.close(fig)


def report_alpha(work: Path) -> list[str]:
    try:
        runs = alpha_runs(work)
    except SystemExit as missing:
        return ["# GN-IVO's alpha", "", f"Not run yet ({missing}).", ""]
    results = {r["key"]: r for r in cached(runs, work)}
    lines = [
        "# GN-IVO's alpha at the tuned learning rate (4-step problems)",
        "",
        f"Generated by `python -m benchmarks.fair_comparison gnivo-alpha` on {time.strftime('%Y-%m-%d')}. Final test "
        f"accuracy (%) after 100 steps, mean ± std over seeds {ALPHA_SEEDS}, at each unit's rate chosen on validation "
        "(alpha 0.2 there); alpha 0.2 is the test part's run. 'vs 0.2': the difference to alpha 0.2 paired by seed, "
        "with its 95% Student t interval, in pp.",
        "",
        "| method | " + " | ".join(f"alpha {a:g}" for a in ALPHAS) + " |",
        "|---|" + "---|" * len(ALPHAS),
    ]
    for method in ALPHA_METHODS:
        cells = []
        for alpha in ALPHAS:
            found = [results[r.key] for r in runs if r["method"] == method and r.key in results and _alpha(r) == alpha]
            if not found:
                cells.append("–")
                continue
            mean, std = mean_std([final_accuracy(r) for r in found])
            cell = f"{pct(mean)} ± {pct(std)} (n={len(found)})"
            if alpha != 0.2:
                base = {
                    r["seed"]: final_accuracy(results[r.key])
                    for r in runs
                    if r["method"] == method and r.key in results and _alpha(r) == 0.2
                }
                paired = [final_accuracy(r) - base[r["seed"]] for r in found if r["seed"] in base]
                if len(paired) > 1:
                    d, low, high = paired_ci(paired)
                    cell += f"; {100 * d:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] vs 0.2"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"CPU time: {seconds(list(results.values())) / 60:.0f} min for {len(results)} runs.", ""]
    return lines


def _alpha(run: Run) -> float:
    return run["overrides"].get("gnivo_alpha", 0.2)


def _report_runs(name: str, work: Path) -> list[dict]:
    """The cached runs a report is built from (for its provenance line)."""
    if name == "learning_tuning.md":
        return [r for h in HORIZONS for r in cached(tuning_runs(h), work)]
    if name == "learning_vimpo_map.md":
        return cached(map_runs(), work)
    try:
        if name == "learning.md":
            runs = []
            for horizon in HORIZONS:
                try:
                    runs += cached(test_runs(horizon, work), work)
                except SystemExit:  # that horizon is not tuned yet
                    pass
            return runs
        return cached(alpha_runs(work), work)
    except SystemExit:
        return []


def write_reports(work: Path) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, lines in (
        ("learning.md", report_test(work)),
        ("learning_tuning.md", report_tuning(work)),
        ("learning_vimpo_map.md", report_map(work)),
        ("learning_gnivo_alpha.md", report_alpha(work)),
    ):
        reporting.write_report(RESULTS / name, "\n".join(lines), _report_runs(name, work))
        print(f"wrote {RESULTS / name}")


def wait_for_tuning(horizon: int, work: Path) -> None:
    """Block until the tuning grid at ``horizon`` is complete (another process may still be finishing it)."""
    while True:
        try:
            chosen_rates(horizon, work)
            return
        except SystemExit as missing:
            print(f"waiting: {missing}", flush=True)
            time.sleep(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["tune", "test", "vimpo-map", "gnivo-alpha", "all", "report"])
    parser.add_argument("--horizon", type=int, choices=sorted(HORIZONS), default=4)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i (one process per core)")
    parser.add_argument("--work-dir", default=".cache/fair-comparison", help="cached per-run results (resumable)")
    parser.add_argument("--cache-dir", default=None, help="where warm starts are cached (default ~/.cache/gnivo-trl)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--wait", action="store_true", help="test / gnivo-alpha: wait until tuning is complete")
    parser.add_argument("--no-report", action="store_true", help="do not write the reports at the end")
    args = parser.parse_args(argv)
    reporting.provenance()  # the code this process runs, recorded now: later commits do not change it
    import torch

    torch.set_num_threads(args.threads)  # a 0.1M-parameter model gains nothing from intra-op threads
    work = Path(args.work_dir)
    if args.wait and args.part in ("test", "gnivo-alpha"):
        wait_for_tuning(args.horizon if args.part == "test" else 4, work)
    if args.part == "all":  # every part in dependency order; each shard waits for the grid the next part needs
        for horizon in HORIZONS:
            run_all(tuning_runs(horizon), args)
        run_all(map_runs(), args)
        for horizon in HORIZONS:
            wait_for_tuning(horizon, work)
            run_all(test_runs(horizon, work), args)
        run_all(alpha_runs(work), args)
    elif args.part == "tune":
        run_all(tuning_runs(args.horizon), args)
    elif args.part == "test":
        run_all(test_runs(args.horizon, work), args)
    elif args.part == "vimpo-map":
        run_all(map_runs(), args)
    elif args.part == "gnivo-alpha":
        run_all(alpha_runs(work), args)
    if args.shard.startswith("0/") and not args.no_report:
        write_reports(work)


if __name__ == "__main__":
    main()
