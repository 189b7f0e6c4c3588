"""Does RL improve the warm-started model on the synthetic chained-arithmetic task, and which algorithm does it best?

Every method starts from the same warm start (:func:`gnivo_trl.synthetic.build_warm_start`) and, for a given seed,
sees the same prompts at every step (TRL's sampler is seeded by ``seed``), the same number of completions per prompt
(K), the same optimizer (AdamW), learning rate and schedule, and the same number of optimizer steps (one per
generation batch, ``num_iterations=1``). Test accuracy is the share of held-out test problems solved exactly by one
sample at temperature 1; every evaluation uses the same problems and the same sampling seed (common random numbers).

Methods (nothing was tuned for any of them on this task):

- ``grpo``: TRL's own ``GRPOTrainer``, its 1.16 defaults written out (``loss_type="dapo"``,
  ``scale_rewards="group"``, ``beta=0.0``, ``epsilon=epsilon_high=0.2``, token-level importance sampling).
- ``gnivo-token`` / ``gnivo-step`` / ``gnivo-sequence``: ``GNIVOTrainer`` with ``gnivo_alpha=0.2`` (the paper's),
  softmax weights, and each prefix unit (``step`` = one line of the solution, delimiter ``"\\n\\n"``).
- ``vimpo-b5e-4-c0`` / ``vimpo-b5e-4-c5e-3``: ``VIMPOTrainer`` with the paper's ``vimpo_beta=5e-4``, value only and with
  the paper's actor weight 5e-3. The paper's beta is tuned for responses of up to 4096 tokens; the policy-implied
  value is a sum of ``beta * log-ratio`` over the response, so a 32-token response needs log-ratios about 128x larger
  to express the same value. We therefore also run
- ``vimpo-b5e-2-c0`` / ``vimpo-b5e-2-c5e-3``: ``vimpo_beta=5e-2``, the paper's value scaled by roughly 4096 / 32 and
  rounded to a power of ten. This was chosen from that arithmetic before any run, not tuned.

VIMPO keeps its own defaults for the actor's clip range (0.2 / 0.28) and the exact full-vocabulary KL.

The shared learning rate (2e-4, AdamW, constant) was chosen on GRPO alone, before any other method was run: a
20-step probe with seed 0 took GRPO from 26% to 37% test accuracy at 2e-4 and collapsed it to 0% at 1e-3.

CPU configuration (the default; what ``benchmarks/results/learning_shared_rate.md`` reports; the fair, per-method
tuned comparison built on this protocol is ``benchmarks/fair_comparison.py``, reported in ``learning.md``)::

    python benchmarks/learning.py

GPU configuration (documented, not run here): a larger warm start and more of everything::

    python benchmarks/learning.py --preset gpu

which means ``--warm-start-hidden 512 --warm-start-layers 6 --warm-start-examples 200000 --num-steps 6 --steps 300
--prompts-per-step 32 --num-generations 8 --learning-rate 1e-4 --eval-every 25 --eval-problems 2000 --seeds 0 1 2 3
4`` on one GPU (float32 throughout; the warm start's SFT also runs on the GPU). Six-step problems start the warm
start lower (about 0.8 ** 6 = 26% if it learns the noisy solver exactly) and give step-level credit assignment more
to work with. Neither the preset's numbers nor its learning rate have been tried. Raw per-run results go to ``--work-dir`` (default ``.cache/learning-benchmark``,
ignored by git), so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import gnivo_trl.testing  # noqa: F401, I001  (offline environment variables before any Hugging Face import)
from gnivo_trl.synthetic import (
    AccuracyCallback,
    WarmStartConfig,
    build_warm_start,
    chain_reward,
    generate_problems,
    make_rl_dataset,
)

RESULTS = Path(__file__).parent / "results"

GRPO_DEFAULTS = dict(  # TRL 1.16's GRPOConfig defaults, written out so that a TRL upgrade cannot change them silently
    loss_type="dapo",
    scale_rewards="group",
    beta=0.0,
    epsilon=0.2,
    epsilon_high=0.2,
    importance_sampling_level="token",
    mask_truncated_completions=False,
    top_entropy_quantile=1.0,
)

METHODS: dict[str, tuple[str, dict]] = {
    "grpo": ("grpo", GRPO_DEFAULTS),
    "gnivo-token": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="token")),
    "gnivo-step": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="step", gnivo_step_delimiter="\n\n")),
    "gnivo-sequence": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="sequence")),
    "vimpo-b5e-4-c0": ("vimpo", dict(vimpo_beta=5e-4, vimpo_actor_coeff=0.0)),
    "vimpo-b5e-4-c5e-3": ("vimpo", dict(vimpo_beta=5e-4, vimpo_actor_coeff=5e-3)),
    "vimpo-b5e-2-c0": ("vimpo", dict(vimpo_beta=5e-2, vimpo_actor_coeff=0.0)),
    "vimpo-b5e-2-c5e-3": ("vimpo", dict(vimpo_beta=5e-2, vimpo_actor_coeff=5e-3)),
}

PRESETS = {
    "cpu": dict(
        steps=100,
        prompts_per_step=8,
        num_generations=8,
        learning_rate=2e-4,
        eval_every=10,
        eval_problems=500,
        seeds=[0, 1, 2, 3, 4],
        num_steps=4,
    ),
    "gpu": dict(
        steps=300,
        prompts_per_step=32,
        num_generations=8,
        learning_rate=1e-4,
        eval_every=25,
        eval_problems=2000,
        seeds=[0, 1, 2, 3, 4],
        num_steps=6,
        warm_start_hidden=512,
        warm_start_layers=6,
        warm_start_examples=200_000,
    ),
}


def trainer_classes(family: str):
    """``(config class, trainer class)`` of an algorithm family."""
    if family == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    from gnivo_trl import GNIVOConfig, GNIVOTrainer, VIMPOConfig, VIMPOTrainer

    return {"gnivo": (GNIVOConfig, GNIVOTrainer), "vimpo": (VIMPOConfig, VIMPOTrainer)}[family]


def protocol_settings(args, seed: int) -> dict:
    """The config fields every method shares in this protocol (``benchmarks/agent_learning.py`` uses them too)."""
    import torch

    batch = args.prompts_per_step * args.num_generations
    return dict(
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        num_generations=args.num_generations,
        per_device_train_batch_size=batch,  # one generation batch = one optimizer step, the same for every method
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )


def run_one(
    method: str,
    seed: int,
    model_dir: str,
    args,
    output_dir: Path,
    *,
    overrides: dict | None = None,
    eval_problems: list[str] | None = None,
    save_to: Path | None = None,
) -> dict:
    """Train one method from the warm start for ``args.steps`` steps; returns its accuracy curve and timings.

    Args:
        overrides: config fields that replace the method's settings and the shared ones (``learning_rate``,
            ``vimpo_beta``, ...): how ``benchmarks/fair_comparison.py`` runs its grids with this very protocol.
        eval_problems: the problems the accuracy curve is measured on (default: ``args.eval_problems`` test
            problems).
        save_to: where the trained policy is saved when training ends (default: not saved).
    """
    from transformers import AutoTokenizer, PrinterCallback

    family, settings = METHODS[method]
    config_cls, trainer_cls = trainer_classes(family)
    shared = protocol_settings(args, seed)
    config = config_cls(
        output_dir=str(output_dir / f"{method}-seed{seed}"), **{**shared, **settings, **(overrides or {})}
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if eval_problems is None:
        eval_problems = generate_problems(args.eval_problems, "test", args.num_steps, seed=0)
    callback = AccuracyCallback(tokenizer, eval_problems, every=args.eval_every, seed=1234)
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=chain_reward,
        args=config,
        train_dataset=make_rl_dataset(args.train_problems, "train", args.num_steps, seed=0),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # the benchmark prints one line per run
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    if save_to is not None:
        trainer.save_model(str(save_to))
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    metrics: dict[str, list[float]] = {}  # the trainers' own per-step metrics (vimpo/*, gnivo/*)
    for entry in trainer.state.log_history:
        for name, value in entry.items():
            if name.startswith(("vimpo/", "gnivo/")):
                metrics.setdefault(name, []).append(value)
    return {
        "method": method,
        "seed": seed,
        "accuracy": callback.history,
        "train_reward": rewards,
        "metrics": metrics,
        "seconds_total": seconds,
        "seconds_training": seconds - callback.eval_seconds,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# Two-sided 95% Student t quantiles by degrees of freedom (paired differences over a handful of seeds).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_ci(differences: list[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t confidence interval of paired differences (NaN bounds for one pair)."""
    mean, std = mean_std(differences)
    if len(differences) < 2:
        return mean, math.nan, math.nan
    half = T_975[len(differences) - 1] * std / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def summarize(runs: list[dict], methods: list[str], args, command: str, warm_start: dict) -> str:
    """The markdown report: accuracy table, steps to GRPO's final accuracy, wall times, setup and command."""
    by_method = {m: [r for r in runs if r["method"] == m] for m in methods}
    steps = sorted({step for r in runs for step, _ in r["accuracy"]})
    curves = {}
    for method, method_runs in by_method.items():
        curves[method] = {
            step: [dict(r["accuracy"])[step] for r in method_runs if step in dict(r["accuracy"])] for step in steps
        }
    final = steps[-1]
    grpo_final = statistics.fmean(curves["grpo"][final]) if "grpo" in curves and curves["grpo"][final] else None
    lines = [
        "# Learning benchmark: synthetic chained arithmetic mod 10",
        "",
        f"Generated by `benchmarks/learning.py` on {time.strftime('%Y-%m-%d')}. Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- Task: {args.num_steps}-step chained arithmetic mod 10 (`gnivo_trl.synthetic`), exact verifier "
        "(every step and the boxed answer must be right).",
        f"- Warm start: {warm_start.get('parameters', '?'):,}-parameter Qwen2 model, SFT on noisy solutions "
        f"(per-step error rate {warm_start['config']['error_rate']}), cached; its own check: "
        f"{warm_start['test_accuracy_t1_256']:.1%} of 256 test problems.",
        f"- RL: {args.steps} optimizer steps, {args.prompts_per_step} prompts x K={args.num_generations} completions "
        f"per step, AdamW, constant learning rate {args.learning_rate}, max_grad_norm 1.0, "
        f"max {args.max_completion_length} completion tokens, temperature 1. The learning rate was chosen on GRPO "
        "alone before any other method ran (a 20-step, seed-0 probe: 2e-4 improved GRPO, 1e-3 collapsed it to 0%).",
        f"- Test accuracy: {args.eval_problems} held-out test problems, one sample each at temperature 1, "
        "the same problems and sampling seed at every evaluation. Mean ± sample std over seeds "
        f"{', '.join(str(s) for s in sorted({r['seed'] for r in runs}))}.",
        "- Methods and their settings: see the docstring of `benchmarks/learning.py`.",
        "",
        "## Test accuracy (%) at fixed steps",
        "",
        "| method | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for method in methods:
        cells = []
        for step in steps:
            values = curves[method][step]
            if values:
                mean, std = mean_std(values)
                cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
            else:
                cells.append("–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Steps to reach GRPO's final accuracy, and wall time",
        "",
        f"GRPO's final mean test accuracy: {100 * grpo_final:.1f}%. 'Steps to reach' is the first evaluated step at "
        "which the method's seed-mean accuracy is at least that (evaluations every "
        f"{args.eval_every} steps; 'not reached' means not within {args.steps} steps)."
        if grpo_final is not None
        else "GRPO was not run.",
        "",
        "| method | final accuracy (%) | gain over warm start (pp) | final minus GRPO, paired by seed (pp) | "
        "steps to GRPO's final | wall time per run, s (training only) |",
        "|---|---|---|---|---|---|",
    ]
    grpo_by_seed = {r["seed"]: dict(r["accuracy"])[final] for r in by_method.get("grpo", [])}
    collapsed = []
    for method in methods:
        method_runs = by_method[method]
        if not method_runs:
            continue
        finals = curves[method][final]
        gains = [dict(r["accuracy"])[final] - dict(r["accuracy"])[steps[0]] for r in method_runs]
        reached = "–"
        if grpo_final is not None:
            reached = next(
                (str(s) for s in steps if curves[method][s] and statistics.fmean(curves[method][s]) >= grpo_final),
                "not reached",
            )
        total, total_std = mean_std([r["seconds_total"] for r in method_runs])
        training, _ = mean_std([r["seconds_training"] for r in method_runs])
        mean, std = mean_std(finals)
        gain, gain_std = mean_std(gains)
        if gain < 0:
            collapsed.append(method)
        paired = [
            dict(r["accuracy"])[final] - grpo_by_seed[r["seed"]] for r in method_runs if r["seed"] in grpo_by_seed
        ]
        difference = "–"
        if method != "grpo" and paired:
            diff_mean, diff_std = mean_std(paired)
            difference = f"{100 * diff_mean:+.1f} ± {100 * diff_std:.1f}"
        lines.append(
            f"| {method} | {100 * mean:.1f} ± {100 * std:.1f} | {100 * gain:+.1f} ± {100 * gain_std:.1f} | "
            f"{difference} | {reached} | {total:.0f} ± {total_std:.0f} ({training:.0f}) |"
        )
    if collapsed:
        lines += [
            "",
            f"Ended below the warm start (collapsed): {', '.join(collapsed)}. Nothing was re-tuned to rescue them.",
        ]
    lines += [
        "",
        "Per-seed final accuracies (%):",
        "",
    ]
    for method in methods:
        per_seed = ", ".join(
            f"seed {r['seed']}: {100 * dict(r['accuracy'])[final]:.1f}"
            for r in sorted(by_method[method], key=lambda r: r["seed"])
        )
        lines.append(f"- {method}: {per_seed}")
    lines += ["", "![test accuracy against step](learning_shared_rate.png)", ""]
    return "\n".join(lines)


def plot_curves(groups: dict[str, list[dict]], path: Path, title: str) -> None:
    """Mean test accuracy against step per group of runs (each a ``run_one`` record), with a ±1 std band over
    seeds; GRPO solid, GN-IVO dashed, the rest dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, group in groups.items():
        if not group:
            continue
        steps = [s for s, _ in group[0]["accuracy"]]
        values = [[dict(r["accuracy"])[s] for r in group] for s in steps]
        means = [100 * statistics.fmean(v) for v in values]
        stds = [100 * (statistics.stdev(v) if len(v) > 1 else 0.0) for v in values]
        style = "-" if name.startswith("grpo") else ("--" if name.startswith("gnivo") else ":")
        width = 2 if name.startswith("grpo") else 1.5
        ax.plot(steps, means, style, marker="o", markersize=3, label=name, linewidth=width)
        ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("test accuracy (%), one sample at T=1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(runs: list[dict], methods: list[str], path: Path, title: str) -> None:
    """:func:`plot_curves` with one curve per method."""
    plot_curves({method: [r for r in runs if r["method"] == method] for method in methods}, path, title)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="cpu (run here) or gpu (documented)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--prompts-per-step", type=int, default=None)
    parser.add_argument("--num-generations", type=int, default=None, help="K, completions per prompt")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-problems", type=int, default=None)
    parser.add_argument("--num-steps", type=int, default=None, help="reasoning steps per problem (difficulty)")
    parser.add_argument("--train-problems", type=int, default=4096)
    parser.add_argument("--max-completion-length", type=int, default=48)
    parser.add_argument("--warm-start-hidden", type=int, default=None)
    parser.add_argument("--warm-start-layers", type=int, default=None)
    parser.add_argument("--warm-start-examples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--cache-dir", default=None, help="where the warm start is cached (default ~/.cache/gnivo-trl)"
    )
    parser.add_argument("--work-dir", default=".cache/learning-benchmark", help="raw per-run results (resumable)")
    parser.add_argument("--report", default=str(RESULTS / "learning_shared_rate.md"))
    parser.add_argument("--plot", default=str(RESULTS / "learning_shared_rate.png"))
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.methods = args.methods or list(METHODS)
    if "grpo" not in args.methods:
        args.methods.insert(0, "grpo")  # every comparison is against GRPO
    return args


def warm_start_config(args) -> WarmStartConfig:
    """The default warm start, with the preset's or the command line's size overrides."""
    overrides = {}
    if args.num_steps is not None:
        overrides["num_steps"] = args.num_steps
    if args.warm_start_hidden is not None:
        overrides["hidden_size"] = args.warm_start_hidden
        overrides["intermediate_size"] = 2 * args.warm_start_hidden
    if args.warm_start_layers is not None:
        overrides["num_hidden_layers"] = args.warm_start_layers
    if args.warm_start_examples is not None:
        overrides["num_examples"] = args.warm_start_examples
    return WarmStartConfig(**overrides)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    # A 0.1M-parameter model gains nothing from intra-op threads; on a shared machine they thrash (measured: one
    # thread ran a training step 10x faster than two while other jobs used the cores).
    torch.set_num_threads(args.threads)
    command = "python benchmarks/learning.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    model_dir = build_warm_start(warm_start_config(args), cache_dir=args.cache_dir)
    warm_start = json.loads((Path(model_dir) / "warm_start.json").read_text())
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    total = len(args.methods) * len(args.seeds)
    # Seed-major order: a partial benchmark still compares every method on the seeds it finished.
    for seed in args.seeds:
        for method in args.methods:
            key = f"{method}-seed{seed}-{args.steps}x{args.prompts_per_step}x{args.num_generations}-lr{args.learning_rate}"
            path = work / f"{key}.json"
            if path.exists():
                run = json.loads(path.read_text())
            else:
                run = run_one(method, seed, model_dir, args, work / "trainers")
                path.write_text(json.dumps(run))
            runs.append(run)
            print(
                f"[{len(runs)}/{total}] {method} seed {seed}: accuracy "
                + " ".join(f"{s}:{a:.3f}" for s, a in run["accuracy"])
                + f"  ({run['seconds_total']:.0f} s; {time.perf_counter() - started:.0f} s elapsed)",
                flush=True,
            )
    from transformers import AutoModelForCausalLM

    warm_start["parameters"] = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    report = summarize(runs, args.methods, args, command.strip(), warm_start)
    run_minutes = sum(r["seconds_total"] for r in runs) / 60
    report += (
        f"\nWall time: the {len(runs)} runs took {run_minutes:.1f} min in all (sum of per-run times, evaluation included; "
        f"this invocation: {(time.perf_counter() - started) / 60:.1f} min, runs already in --work-dir are reused, so "
        "runs may have been executed by several processes sharing --work-dir, e.g. one per seed). Measured on 2 CPU "
        "cores shared with other jobs, one torch thread per process.\n"
    )
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(report)
    plot(runs, args.methods, Path(args.plot), f"{args.num_steps}-step arithmetic mod 10, {len(args.seeds)} seeds")
    print(report)
    return runs


if __name__ == "__main__":
    main()
    sys.exit(0)
