"""The agents study: GRPO vs RLOO vs GN-IVO (turn and token units) vs VIMPO on the offline tool-calling task.

The task is :mod:`gnivo_trl.agent_task`: 4-step chained arithmetic mod 10 solved by calling ``calculate(a, op, b)``
once per step through TRL's tool loop (``tools=[calculate]``), rewarded by ``tool_chain_reward`` (1.0 only when
every call has its step's operands, in order, and the boxed answer is right). Every method starts from the same
cached warm start (:func:`gnivo_trl.agent_task.build_tool_warm_start`) and follows the shared protocol
(``benchmarks/protocol.py``) with 60 steps instead of 100 (this task learns fast; at 100 steps the GN-IVO demo is at
90%, near saturation): the same prompts per step for a given seed, 8 prompts x K=8, AdamW, constant learning rate,
max_grad_norm 1.0, temperature 1, one optimizer step per generation batch, at most 5 tool calls per rollout. Accuracy:
problems solved through the same tool loop, one sample each at temperature 1, the same problems and sampling seed at
every evaluation.

Methods (:data:`METHODS`): ``grpo`` (TRL's defaults written out), ``rloo`` (TRL's ``RLOOTrainer`` takes no tools, so
``GRPOTrainer`` with leave-one-out advantages: ``protocol.RLOO_AS_GRPO``), ``gnivo-turn`` and ``gnivo-token`` (alpha
0.2), ``vimpo`` (beta 5e-2 and the paper's actor weight 5e-3: ``beta * L / c_A`` is about 360 at the ~36 model tokens
of an answer, far from the collapse measured in the fair comparison's VIMPO map). Tool output is masked out of every
loss.

Parts, as in the fair comparison: ``tune`` (every method at every rate of :data:`LEARNING_RATES`, seeds 0 and 1, final
accuracy on :data:`EVAL_PROBLEMS` validation problems: train-split problems in neither the RL prompts nor the warm
start's SFT rollouts), then ``test`` (5 fresh seeds at each method's chosen rate, held-out test problems), each
with ``--noise P`` to flip each training reward with probability P (``protocol.noisy_reward``), and ``shared-rate``
(the first version of this study: every method at 2e-4, seeds 0-4, on the test problems). The study's command runs
them all in two processes and writes ``benchmarks/results/agents/``::

    make agents-benchmark

or part by part, from the repository root::

    for i in 0 1; do python -m benchmarks.agent_learning all --shard $i/2 & done; wait
    python -m benchmarks.agent_learning report

Runs are cached in ``--work-dir`` (default ``.cache/agent-benchmark``): an interrupted part resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks import protocol, reporting
from benchmarks.protocol import (
    Run,
    cached,
    choose_rate,
    final_accuracy,
    make_run,
    mean_std,
    paired,
    paired_cell,
    pct,
)

STUDY = "agents"
WARM_START = None  # a gnivo_trl.agent_task.ToolWarmStartConfig; None: its defaults (what the results use)

METHODS: dict[str, tuple[str, dict]] = {
    "grpo": ("grpo", protocol.GRPO_DEFAULTS),
    "rloo": ("grpo", protocol.RLOO_AS_GRPO),
    "gnivo-turn": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="turn")),
    "gnivo-token": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="token")),
    "vimpo": ("vimpo", dict(vimpo_beta=5e-2, vimpo_actor_coeff=5e-3)),
}
SHARED_RATE_METHODS = ["grpo", "gnivo-turn", "gnivo-token", "vimpo"]  # the first version of the study
STEPS = 60
PROMPTS_PER_STEP = 8
NUM_GENERATIONS = 8
EVAL_PROBLEMS = 300
EVAL_EVERY = 10
SHARED_RATE = 2e-4
SHARED_RATE_SEEDS = [0, 1, 2, 3, 4]
# The fair comparison's 4-step grid, and one rate above it: on clean rewards every method's best validation rate was
# its top, 8e-4, so the grid did not bracket the choice (every method gets the same grid).
LEARNING_RATES = [1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]
TUNING_SEEDS = protocol.TUNING_SEEDS
TEST_SEEDS = protocol.TEST_SEEDS
NOISES = [0.0, 0.25]


def warm_start_config():
    from gnivo_trl.agent_task import ToolWarmStartConfig

    return WARM_START or ToolWarmStartConfig()


def validation_problems(count: int | None = None) -> list[str]:
    """Train-split problems in neither the RL prompts (``make_tool_rl_dataset(4096, "train", seed=0)``) nor the warm
    start's SFT rollouts (``make_tool_sft_dataset``'s problems: ``problem_seed`` 2000 + the config's seed)."""
    from gnivo_trl.synthetic import generate_problems

    config = warm_start_config()
    count = count or EVAL_PROBLEMS
    used = set(generate_problems(4096, "train", config.num_steps, seed=0))
    used |= set(generate_problems(config.num_examples, "train", config.num_steps, seed=2000 + config.seed))
    candidates = generate_problems(count + len(used) // 100 + 200, "train", config.num_steps, seed=777)
    chosen = [problem for problem in candidates if problem not in used][:count]
    if len(chosen) < count:
        raise RuntimeError("not enough validation problems; raise the candidate count")
    return chosen


def run_one(
    method: str,
    seed: int,
    output_dir: Path,
    *,
    learning_rate: float,
    problems: list[str],
    eval_every: int,
    reward_func=None,
    cache_dir: str | None = None,
    methods: dict[str, tuple[str, dict]] | None = None,
) -> dict:
    """Train one method from the tool warm start; its accuracy curve on ``problems`` and timings. ``methods``: where
    ``method`` is looked up (default :data:`METHODS`)."""
    from transformers import AutoTokenizer, PrinterCallback

    from gnivo_trl.agent_task import (
        ToolAccuracyCallback,
        build_tool_warm_start,
        calculate,
        make_tool_rl_dataset,
        tool_chain_reward,
    )

    warm_config = warm_start_config()
    model_dir = protocol.cached_warm_start(build_tool_warm_start, warm_config, cache_dir)
    family, settings = (methods or METHODS)[method]
    config_cls, trainer_cls = protocol.trainer_classes(family)
    # A call and its response take about 20 tokens: room for every step, its answer and a stray call.
    shared = protocol.protocol_settings(
        argparse.Namespace(
            prompts_per_step=PROMPTS_PER_STEP,
            num_generations=NUM_GENERATIONS,
            max_completion_length=32 * (warm_config.num_steps + 1),
            steps=STEPS,
            learning_rate=learning_rate,
        ),
        seed,
    )
    config = config_cls(
        output_dir=str(output_dir / f"{method}-seed{seed}"),
        max_tool_calling_iterations=warm_config.num_steps + 1,  # one spare call, then it must answer
        **shared,
        **settings,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    callback = ToolAccuracyCallback(tokenizer, problems, every=eval_every, seed=1234)
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=reward_func or tool_chain_reward,
        args=config,
        train_dataset=make_tool_rl_dataset(4096, "train", warm_config.num_steps, seed=0),
        processing_class=tokenizer,
        callbacks=[callback],
        tools=[calculate],
    )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    result = {
        "method": method,
        "seed": seed,
        "accuracy": callback.history,
        "train_reward": [entry["reward"] for entry in trainer.state.log_history if "reward" in entry],
        "metrics": {
            "frac_reward_zero_std": [
                entry["frac_reward_zero_std"] for entry in trainer.state.log_history if "frac_reward_zero_std" in entry
            ]
        },
        "seconds_total": seconds,
        "seconds_training": seconds - callback.eval_seconds,
        "provenance": reporting.provenance(),
    }
    if isinstance(reward_func, protocol.NoisyReward):
        result["reward_noise"] = reward_func.stats()
    return result


def execute(run: Run, work: Path, cache_dir: str | None) -> dict:
    """The cached result of ``run`` (``horizon`` is the task's 4 steps), training it first if needed."""
    path = work / f"{run.key}.json"
    if path.exists():
        return json.loads(path.read_text())
    from gnivo_trl.agent_task import tool_chain_reward
    from gnivo_trl.synthetic import generate_problems

    validation = run["split"] == "validation"
    result = run_one(
        run["method"],
        run["seed"],
        work / "trainers" / run.key,
        learning_rate=run["overrides"]["learning_rate"],
        problems=validation_problems()
        if validation
        else generate_problems(EVAL_PROBLEMS, "test", warm_start_config().num_steps, seed=0),
        eval_every=STEPS if validation else EVAL_EVERY,  # validation: read at the end only (the rate choice)
        reward_func=protocol.noisy_reward(tool_chain_reward, run["condition"], run["seed"], NUM_GENERATIONS),
        cache_dir=cache_dir,
    )
    result.update(run, key=run.key)
    path.write_text(json.dumps(result))
    return result


def _condition(noise: float) -> dict:
    return {"noise": noise} if noise else {}


def tuning_runs(noise: float) -> list[Run]:
    return [
        make_run(4, method, seed, "validation", _condition(noise), learning_rate=rate)
        for seed in TUNING_SEEDS
        for rate in LEARNING_RATES
        for method in METHODS
    ]


def chosen_rates(noise: float, work: Path) -> dict[str, float]:
    """Per method, the rate with the best mean final validation accuracy (ties: the smaller rate)."""
    results = {r["key"]: r for r in cached(tuning_runs(noise), work)}
    return {
        method: choose_rate(
            results,
            {
                rate: [
                    make_run(4, method, s, "validation", _condition(noise), learning_rate=rate) for s in TUNING_SEEDS
                ]
                for rate in LEARNING_RATES
            },
            f"agents, noise {noise:g}, {method}",
        )
        for method in METHODS
    }


def test_runs(noise: float, work: Path) -> list[Run]:
    rates = chosen_rates(noise, work)
    return [
        make_run(4, method, seed, "test", _condition(noise), learning_rate=rates[method])
        for seed in TEST_SEEDS
        for method in METHODS
    ]


def shared_rate_runs() -> list[Run]:
    return [
        make_run(4, method, seed, "test", learning_rate=SHARED_RATE)
        for seed in SHARED_RATE_SEEDS
        for method in SHARED_RATE_METHODS
    ]


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def comparison_table(
    results: list[dict],
    methods: list[str],
    rates: dict[str, float] | None = None,
    baselines: tuple[str, ...] = ("grpo",),
) -> list[str]:
    """Final accuracy per method, and its difference to each baseline method (GRPO, RLOO) paired by seed with a 95%
    interval; a baseline without runs gets no column."""
    by_method = {m: [r for r in results if r["method"] == m] for m in methods}
    baselines = tuple(b for b in baselines if by_method.get(b))
    names = {"grpo": "GRPO", "rloo": "RLOO"}
    lines = [
        "| method | rate | seeds | step 0 | final accuracy (%) | "
        + " | ".join(f"final − {names.get(b, b)} (pp) [95% CI]" for b in baselines)
        + " | CPU time per run (s) |",
        "|---|---|---|---|---|" + "---|" * len(baselines) + "---|",
    ]
    for method in methods:
        runs = by_method[method]
        if not runs:
            continue
        mean, std = mean_std([final_accuracy(r) for r in runs])
        differences = [
            paired_cell(paired(runs, by_method[b], final_accuracy)) if method != b else "–" for b in baselines
        ]
        rate = f"{rates[method]:g}" if rates else f"{runs[0]['overrides']['learning_rate']:g}"
        lines.append(
            f"| {method} | {rate} | {len(runs)} | {pct(runs[0]['accuracy'][0][1])} | {pct(mean)} ± {pct(std)} | "
            + " | ".join(differences)
            + f" | {statistics.fmean(r['seconds_total'] for r in runs):.0f} |"
        )
    lines += ["", "Per-seed final accuracy (%):", ""]
    for method in methods:
        per_seed = ", ".join(f"{r['seed']}: {pct(final_accuracy(r))}" for r in sorted(by_method[method], key=_seed))
        if per_seed:
            lines.append(f"- {method}: {per_seed}")
    return lines


def drop_table(clean: list[dict], noisy: list[dict], methods: list[str]) -> list[str]:
    """Per method, final accuracy on clean rewards minus on noisy rewards, paired by test seed (each at its own
    condition's chosen rate), with a 95% interval; a method missing either condition gets no row."""
    lines = ["| method | clean (%) | noisy (%) | drop, clean − noisy (pp) [95% CI] |", "|---|---|---|---|"]
    for method in methods:
        clean_by_seed = {r["seed"]: final_accuracy(r) for r in clean if r["method"] == method}
        noisy_by_seed = {r["seed"]: final_accuracy(r) for r in noisy if r["method"] == method}
        seeds = sorted(clean_by_seed.keys() & noisy_by_seed.keys())
        if not seeds:
            continue
        lines.append(
            f"| {method} | {pct(statistics.fmean(clean_by_seed[s] for s in seeds))} "
            f"| {pct(statistics.fmean(noisy_by_seed[s] for s in seeds))} "
            f"| {paired_cell([clean_by_seed[s] - noisy_by_seed[s] for s in seeds])} |"
        )
    return lines


def _seed(result: dict) -> int:
    return result["seed"]


def report(work: Path, results_dir: Path) -> list[Path]:
    """``agent_learning.md`` (tuned rates, clean and noisy rewards) and ``agent_learning_shared_rate.md`` from the
    cached runs, with their plots; returns the paths written."""
    written = []
    results_dir.mkdir(parents=True, exist_ok=True)
    header = [
        "- Task: `gnivo_trl.agent_task`, 4-step chained arithmetic mod 10 through the `calculate` tool (TRL's tool "
        "loop), reward `tool_chain_reward`. Warm start: `build_tool_warm_start()` (cached SFT).",
        f"- RL: {STEPS} optimizer steps, {PROMPTS_PER_STEP} prompts x K={NUM_GENERATIONS}, AdamW, constant learning "
        "rate, max_grad_norm 1.0, temperature 1 (`benchmarks/protocol.py`; methods in `benchmarks/agent_learning.py`; "
        "`rloo` is GRPOTrainer with leave-one-out advantages, RLOO's gradient up to a constant, because TRL's "
        "RLOOTrainer takes no tools).",
    ]
    lines = [
        "# Agents: GRPO vs RLOO vs GN-IVO vs VIMPO on the offline tool-calling task, each method tuned",
        "",
        f"Generated by `python -m benchmarks.agent_learning report` on {time.strftime('%Y-%m-%d')} from the cached "
        "runs (parts `tune` and `test`, each clean and with `--noise 0.25`).",
        "",
        *header,
        f"- Tuning: rates {LEARNING_RATES} for every method, seeds {TUNING_SEEDS}, final accuracy on {EVAL_PROBLEMS} "
        "validation problems (train-split problems in neither the RL prompts nor the SFT rollouts); the best mean is "
        f"chosen (ties: the smaller rate). Test: seeds {TEST_SEEDS} at the chosen rate, {EVAL_PROBLEMS} held-out "
        f"test problems through the tool loop, one sample each at temperature 1, every {EVAL_EVERY} steps; "
        "differences to GRPO paired by seed with 95% Student t intervals.",
        "- Reward noise: each training reward flipped (1 <-> 0) independently with probability p, seeded by the "
        "run's seed and step (the same flips for every method at a seed); evaluation uses the exact reward.",
        "",
    ]
    used: list[dict] = []
    clean_results: list[dict] = []  # the clean test runs, for the drop under noise
    for noise in NOISES:
        title = "Clean rewards" if not noise else f"Noisy rewards, p = {noise:g}"
        tuning = cached(tuning_runs(noise), work)
        used += tuning
        lines += [f"## {title}", "", "Validation accuracy after training (%), mean of the tuning seeds:", ""]
        lines += ["| method | " + " | ".join(f"lr {r:g}" for r in LEARNING_RATES) + " |"]
        lines += ["|---|" + "---|" * len(LEARNING_RATES)]
        by_key = {r["key"]: r for r in tuning}
        for method in METHODS:
            cells = []
            for rate in LEARNING_RATES:
                finals = [
                    final_accuracy(by_key[k])
                    for k in (
                        make_run(4, method, s, "validation", _condition(noise), learning_rate=rate).key
                        for s in TUNING_SEEDS
                    )
                    if k in by_key
                ]
                cells.append(pct(statistics.fmean(finals)) if finals else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        try:
            rates = chosen_rates(noise, work)
        except SystemExit as missing:
            lines += [f"Test runs not possible yet ({missing}).", ""]
            continue
        results = cached(test_runs(noise, work), work)
        used += results
        lines += ["Test accuracy at each method's chosen rate:", ""]
        lines += comparison_table(results, list(METHODS), rates, baselines=("grpo", "rloo"))
        if noise and clean_results:
            lines += [
                "",
                "Drop from the clean run, paired by test seed:",
                "",
                *drop_table(clean_results, results, list(METHODS)),
            ]
        if not noise:
            clean_results = results
        flips = [r["reward_noise"]["flip_rate"] for r in results if "reward_noise" in r]
        if flips:
            lines += [
                "",
                f"Realised flip rate over the test runs: {100 * statistics.fmean(flips):.2f}% (p = {noise}).",
            ]
        plot = results_dir / f"agent_learning{'_noise' + str(noise).replace('.', '') if noise else ''}.png"
        protocol.plot_curves(
            {m: [r for r in results if r["method"] == m] for m in METHODS}, plot, f"agent task, {title.lower()}"
        )
        lines += ["", f"![{title}]({plot.name})", ""]
        lines += [
            f"CPU time: {protocol.seconds(tuning + results) / 3600:.2f} CPU-hours for {len(tuning + results)} "
            "runs (tuning and test, evaluation included).",
            "",
        ]
    written.append(reporting.write_report(results_dir / "agent_learning.md", "\n".join(lines), used))

    shared = cached(shared_rate_runs(), work)
    if shared:
        text = [
            "# Agents at one shared learning rate (the study's first version)",
            "",
            f"Generated by `python -m benchmarks.agent_learning report` on {time.strftime('%Y-%m-%d')} (part "
            "`shared-rate`).",
            "",
            *header,
            f"- Every method at {SHARED_RATE:g} (the learning study's shared rate, not tuned here), seeds "
            f"{SHARED_RATE_SEEDS}, {EVAL_PROBLEMS} held-out test problems.",
            "",
            *comparison_table(shared, SHARED_RATE_METHODS),
            "",
        ]
        plot = results_dir / "agent_learning_shared_rate.png"
        protocol.plot_curves(
            {m: [r for r in shared if r["method"] == m] for m in SHARED_RATE_METHODS}, plot, "agent task"
        )
        text += [f"![test accuracy against step]({plot.name})", ""]
        written.append(reporting.write_report(results_dir / "agent_learning_shared_rate.md", "\n".join(text), shared))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["tune", "test", "shared-rate", "all", "report"])
    parser.add_argument("--noise", type=float, default=0.0, help="tune / test: training-reward flip probability")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cache-dir", default=None, help="where the warm start is cached (default ~/.cache/gnivo-trl)"
    )
    parser.add_argument("--work-dir", default=".cache/agent-benchmark")
    parser.add_argument("--results-dir", default=None, help="default: benchmarks/results/agents/")
    parser.add_argument("--no-report", action="store_true", help="do not write the reports at the end")
    args = parser.parse_args(argv)
    reporting.provenance()  # the code this process runs, recorded now: later commits do not change it
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)

    def run(runs: list[Run]) -> None:
        protocol.run_all(runs, args, execute=execute)

    def test(noise: float) -> None:
        while True:  # another process may still be finishing the grid
            try:
                runs = test_runs(noise, work)
                break
            except SystemExit as missing:
                print(f"waiting: {missing}", flush=True)
                time.sleep(30)
        run(runs)

    if args.part == "tune":
        run(tuning_runs(args.noise))
    elif args.part == "test":
        test(args.noise)
    elif args.part == "shared-rate":
        run(shared_rate_runs())
    elif args.part == "all":
        for noise in NOISES:
            run(tuning_runs(noise))
        for noise in NOISES:
            test(noise)
    if args.shard.startswith("0/") and not args.no_report:
        results_dir = Path(args.results_dir) if args.results_dir else reporting.results_dir(STUDY)
        for path in report(work, results_dir):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
