"""The training protocol every learning study shares, and the cached, sharded runs they are made of.

One module, imported by each study (``from benchmarks import protocol``); run the studies from the repository root as
``python -m benchmarks.<study>`` (``benchmarks/README.md``).

**Training** (:func:`run_one`). Every method starts from the same warm start (:func:`gnivo_trl.synthetic.build_warm_start`)
and, for a given seed, sees the same prompts at every step (TRL's sampler is seeded by ``seed``), the same number of
completions per prompt (K), the same optimizer (AdamW), learning rate and schedule, and the same number of optimizer
steps (one per generation batch, ``num_iterations=1``). Test accuracy is the share of held-out problems solved
exactly by one sample at temperature 1; every evaluation uses the same problems and the same sampling seed (common
random numbers). Evaluation always uses the exact verifier, whatever the training reward.

**Methods** (:data:`METHODS`):

- ``grpo``: TRL's own ``GRPOTrainer``, its 1.16 defaults written out (``loss_type="dapo"``, ``scale_rewards="group"``,
  ``beta=0.0``, ``epsilon=epsilon_high=0.2``, token-level importance sampling).
- ``rloo``: TRL's own ``RLOOTrainer`` (REINFORCE with the leave-one-out baseline ``R_i - mean_{j != i} R_j``,
  sequence-level ratio, loss the mean over completions), its 1.16 defaults written out except ``beta=0.0`` (TRL's
  default 0.05 adds a KL-to-reference penalty to the reward; no other method here has one, so the comparison is about
  the baseline, not a penalty). ``RLOOTrainer`` takes no ``tools``: on the agent task ``rloo`` is
  ``GRPOTrainer`` with ``scale_rewards="none"`` and ``loss_type="dr_grpo"`` (:data:`RLOO_AS_GRPO`): its advantage
  ``R_i - mean_g R = (K - 1) / K x`` the leave-one-out one, and its loss a sum over tokens divided by a constant, so
  with one optimizer step per generation batch (ratio 1) its gradient is RLOO's times a positive constant.
- ``gnivo-token`` / ``gnivo-step`` / ``gnivo-sequence``: ``GNIVOTrainer`` with ``gnivo_alpha=0.2`` (the paper's),
  softmax weights, and each prefix unit (``step`` = one line of the solution, delimiter ``"\\n\\n"``).
- ``vimpo-b5e-4-c0`` / ``vimpo-b5e-4-c5e-3``: ``VIMPOTrainer`` with the paper's ``vimpo_beta=5e-4``, value only and
  with the paper's actor weight 5e-3. The paper's beta is tuned for responses of up to 4096 tokens; the
  policy-implied value is a sum of ``beta * log-ratio`` over the response, so a 32-token response needs log-ratios
  about 128x larger to express the same value. Hence also
- ``vimpo-b5e-2-c0`` / ``vimpo-b5e-2-c5e-3``: ``vimpo_beta=5e-2``, the paper's value scaled by about 4096 / 32 and
  rounded to a power of ten (chosen from that arithmetic before any run), and ``vimpo-b5e-2-adaptive``: the same beta
  with the official adaptive actor weight (``vimpo_adaptive_actor_coeff=True``, alpha 0.025, the authors' run
  script), which never collapsed in the fair comparison's map; ``vimpo-b5e-4-adaptive``: the paper's beta with it.
- ``grpo-kl<beta>`` (:func:`anchored_grpo`, beta in :data:`KL_BETAS`): GRPO with TRL's KL penalty to the reference
  model, and ``grpo-noscale``: GRPO with ``scale_rewards="none"`` (the advantage not divided by the group's reward
  std): the controls of ``benchmarks/noise_controls.py``.

VIMPO keeps its own defaults for the actor's clip range (0.2 / 0.28) and the exact full-vocabulary KL.

**Cached runs** (:class:`Run`, :func:`execute`, :func:`run_all`). A run is a horizon (4- or 8-step problems, each
with its own warm start), a method, a seed, a split (``"validation"``: train-split problems in neither the RL prompts
nor the warm start's SFT data; ``"test"``: the held-out test split), config overrides (the learning rate, ...) and a
condition (:data:`CONDITION_FIELDS`: reward noise, K at a fixed number of completions per step, the weak-warm-start
task). Each result is cached as JSON under a work directory keyed by all of these, so a part resumes where it
stopped, and ``--shard i/n`` lets n processes share it (one per core). Each result records the package commit and
library versions it was produced with (:func:`benchmarks.reporting.provenance`).

**Statistics**: mean ± sample std over seeds; differences to GRPO paired by seed (same prompts in the same order,
same reward-noise pattern), 95% Student t intervals (:func:`paired_ci`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import statistics
import time
from pathlib import Path

import gnivo_trl.testing  # noqa: F401, I001  (offline environment variables before any Hugging Face import)
from benchmarks import reporting
from gnivo_trl.rewards import NOISE_MODES, NoisyReward
from gnivo_trl.synthetic import (
    AccuracyCallback,
    WarmStartConfig,
    chain_reward,
    generate_problems,
    make_rl_dataset,
)

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
RLOO_DEFAULTS = dict(  # TRL 1.16's RLOOConfig defaults written out, but beta 0 (see the module docstring)
    beta=0.0,
    epsilon=0.2,
    epsilon_high=0.2,
    normalize_advantages=False,
    reward_clip_range=None,
    mask_truncated_completions=False,
)
# RLOO's gradient with GRPOTrainer (one optimizer step per generation batch), for tasks RLOOTrainer cannot run (tools).
RLOO_AS_GRPO = dict(GRPO_DEFAULTS, scale_rewards="none", loss_type="dr_grpo")
ADAPTIVE_ACTOR = dict(vimpo_adaptive_actor_coeff=True, vimpo_adaptive_actor_alpha=0.025)

METHODS: dict[str, tuple[str, dict]] = {
    "grpo": ("grpo", GRPO_DEFAULTS),
    "rloo": ("rloo", RLOO_DEFAULTS),
    "gnivo-token": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="token")),
    "gnivo-step": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="step", gnivo_step_delimiter="\n\n")),
    "gnivo-sequence": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="sequence")),
    "vimpo-b5e-4-c0": ("vimpo", dict(vimpo_beta=5e-4, vimpo_actor_coeff=0.0)),
    "vimpo-b5e-4-c5e-3": ("vimpo", dict(vimpo_beta=5e-4, vimpo_actor_coeff=5e-3)),
    "vimpo-b5e-2-c0": ("vimpo", dict(vimpo_beta=5e-2, vimpo_actor_coeff=0.0)),
    "vimpo-b5e-2-c5e-3": ("vimpo", dict(vimpo_beta=5e-2, vimpo_actor_coeff=5e-3)),
    "vimpo-b5e-2-adaptive": ("vimpo", dict(vimpo_beta=5e-2, **ADAPTIVE_ACTOR)),  # vimpo_actor_coeff ignored
    "vimpo-b5e-4-adaptive": ("vimpo", dict(vimpo_beta=5e-4, **ADAPTIVE_ACTOR)),  # the paper's beta and actor weight
    # GRPO's controls (benchmarks/noise_controls.py): without the std normalisation, and with TRL's KL penalty.
    "grpo-noscale": ("grpo", dict(GRPO_DEFAULTS, scale_rewards="none")),
}
KL_BETAS = (0.01, 0.04, 0.1, 0.25, 0.625)  # TRL's KL penalty (0.04 its former default); the last two: extensions


def anchored_grpo(beta: float) -> str:
    """The name of GRPO with TRL's KL penalty ``beta`` to the reference model (:data:`METHODS`)."""
    return f"grpo-kl{beta:g}"


METHODS.update({anchored_grpo(beta): ("grpo", dict(GRPO_DEFAULTS, beta=beta)) for beta in KL_BETAS})

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
    """``(config class, trainer class)`` of an algorithm family: ``grpo``, ``rloo``, ``gnivo`` or ``vimpo``."""
    if family == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    if family == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        return RLOOConfig, RLOOTrainer
    from gnivo_trl import GNIVOConfig, GNIVOTrainer, VIMPOConfig, VIMPOTrainer

    return {"gnivo": (GNIVOConfig, GNIVOTrainer), "vimpo": (VIMPOConfig, VIMPOTrainer)}[family]


def protocol_settings(args, seed: int) -> dict:
    """The config fields every method shares in this protocol (``args``: ``prompts_per_step``, ``num_generations``,
    ``max_completion_length``, ``steps``, ``learning_rate``)."""
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


def noisy_reward(reward_func, condition: dict, seed: int, num_generations: int) -> NoisyReward | None:
    """The training reward under a condition's reward noise (:data:`CONDITION_FIELDS` ``noise`` and ``flips``), or
    None for exact rewards: :class:`gnivo_trl.rewards.NoisyReward` seeded with the run's seed, so that every method
    at a seed sees the same flips (common random numbers, as for the prompts). ``flips`` defaults to
    ``"independent"``, the paper-claims study's model."""
    if not condition.get("noise"):
        return None
    return NoisyReward(
        reward_func,
        condition["noise"],
        mode=condition.get("flips", "independent"),
        num_generations=num_generations,
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
    reward_func=None,
) -> dict:
    """Train one method from the warm start for ``args.steps`` steps; returns its accuracy curve and timings.

    Args:
        overrides: config fields that replace the method's settings and the shared ones (``learning_rate``,
            ``vimpo_beta``, ...).
        eval_problems: the problems the accuracy curve is measured on (default: ``args.eval_problems`` test
            problems).
        save_to: where the trained policy is saved when training ends (default: not saved).
        reward_func: the training reward (default :func:`gnivo_trl.synthetic.chain_reward`); a :class:`NoisyReward`
            adds its realised flip counts to the result as ``reward_noise``.
    """
    from transformers import AutoTokenizer, PrinterCallback

    code = reporting.provenance()  # computed once per process, at its first run at the latest
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
        reward_funcs=reward_func or chain_reward,
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
            if name.startswith(("vimpo/", "gnivo/")) or name == "frac_reward_zero_std":
                metrics.setdefault(name, []).append(value)
    result = {
        "method": method,
        "seed": seed,
        "accuracy": callback.history,
        "train_reward": rewards,
        "metrics": metrics,
        "seconds_total": seconds,
        "seconds_training": seconds - callback.eval_seconds,
        "provenance": code,
    }
    if isinstance(reward_func, NoisyReward):
        result["reward_noise"] = reward_func.stats()
    return result


# --------------------------------------------------------------------------------------------------------------------
# Statistics and plots
# --------------------------------------------------------------------------------------------------------------------


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


def plot_curves(groups: dict[str, list[dict]], path: Path, title: str) -> None:
    """Mean test accuracy against step per group of runs (each a :func:`run_one` record), with a ±1 std band over
    seeds; GRPO solid, GN-IVO dashed, the rest dotted. The PNG carries the runs' provenance in its metadata."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, group in groups.items():
        if not group:
            continue
        steps = [s for s, _ in group[0]["accuracy"]]
        values = [[dict(r["accuracy"])[s] for r in group if s in dict(r["accuracy"])] for s in steps]
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
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata=reporting.png_metadata([r for g in groups.values() for r in g]))
    plt.close(fig)


def warm_start_config_from_args(args) -> WarmStartConfig:
    """The default warm start, with a preset's or the command line's size overrides (``num_steps``,
    ``warm_start_hidden``, ``warm_start_layers``, ``warm_start_examples``)."""
    overrides = {}
    if getattr(args, "num_steps", None) is not None:
        overrides["num_steps"] = args.num_steps
    if getattr(args, "warm_start_hidden", None) is not None:
        overrides["hidden_size"] = args.warm_start_hidden
        overrides["intermediate_size"] = 2 * args.warm_start_hidden
    if getattr(args, "warm_start_layers", None) is not None:
        overrides["num_hidden_layers"] = args.warm_start_layers
    if getattr(args, "warm_start_examples", None) is not None:
        overrides["num_examples"] = args.warm_start_examples
    return WarmStartConfig(**overrides)


# --------------------------------------------------------------------------------------------------------------------
# Cached, sharded runs on the validation and test splits
# --------------------------------------------------------------------------------------------------------------------

HORIZONS = {4: dict(num_steps=4, max_completion_length=48), 8: dict(num_steps=8, max_completion_length=96)}
EVAL_PROBLEMS = 500
TUNING_SEEDS = [0, 1]
TEST_SEEDS = [10, 11, 12, 13, 14]
COMPLETIONS_PER_STEP = 64  # prompts x K: fixed when K varies
# The weak-warm-start task: the same 4-step problems and SFT recipe, but solutions with 35% of their steps corrupted
# (instead of 20%), so the warm start solves about 10% of the problems (25 of 256 in its own check; 45% gave a warm
# start that solves none, 30% also 10%); 200 RL steps instead of 100.
TASKS = {"weak": dict(error_rate=0.35, steps=200)}
CONDITION_FIELDS = {
    "noise": "probability of flipping a training reward (1 <-> 0), or a group's rewards, seeded per run and step",
    "flips": "the noise model: 'group' (every reward of a prompt's group at once, the VIMPO authors') or "
    "'independent' (each reward on its own; the default, absent from the key)",
    "k": f"completions per prompt K, at {COMPLETIONS_PER_STEP} completions per step ({COMPLETIONS_PER_STEP} / K prompts)",
    "task": f"the task variant: {', '.join(TASKS)} (see TASKS)",
}


def protocol(horizon: int, eval_every: int, condition: dict | None = None) -> argparse.Namespace:
    """The CPU protocol at a horizon (100 steps, 8 prompts x K=8, the default warm-start recipe), under a condition."""
    condition = condition or {}
    preset = dict(PRESETS["cpu"])
    preset.update(HORIZONS[horizon], eval_every=eval_every, eval_problems=EVAL_PROBLEMS, train_problems=4096)
    if "k" in condition:
        k = condition["k"]
        if COMPLETIONS_PER_STEP % k:
            raise ValueError(f"K={k} does not divide {COMPLETIONS_PER_STEP} completions per step")
        preset.update(num_generations=k, prompts_per_step=COMPLETIONS_PER_STEP // k)
    if "task" in condition:
        preset["steps"] = TASKS[condition["task"]]["steps"]
    return argparse.Namespace(**preset)


def warm_start_config(horizon: int, task: str | None = None) -> WarmStartConfig:
    """The default recipe; 8-step problems need 4 layers (2 layers reach a loss of 0.31 and solve 0% of them: they
    copy the wrong operand from the prompt after the third step) and 8 epochs: with 4 epochs (the recipe until
    2026-12-07) the SFT stops at a loss of 0.16-0.27 in the current environment and solves 0-0.4% of 256 test
    problems, copying the seventh operand wrong; 8 epochs reach 0.12-0.13 and solve 16% with seeds 0 and 1 (the
    archived 4-epoch build solved 14.6%). ``task="weak"``: more injected step errors."""
    fields = dict(num_steps=horizon, num_hidden_layers=2 if horizon <= 4 else 4)
    if horizon > 4:
        fields["epochs"] = 8.0
    if task is not None:
        fields["error_rate"] = TASKS[task]["error_rate"]
    return WarmStartConfig(**fields)


def validation_problems(horizon: int, count: int = EVAL_PROBLEMS) -> list[str]:
    """Train-split problems in neither the RL prompts (``make_rl_dataset(4096, "train", seed=0)``) nor the warm
    start's SFT data (the same for every task variant); the test split is disjoint by construction."""
    config = warm_start_config(horizon)
    used = set(generate_problems(4096, "train", horizon, seed=0))
    used |= set(generate_problems(config.num_examples, "train", horizon, seed=1000 + config.seed))
    candidates = generate_problems(count + len(used) // 100 + 200, "train", horizon, seed=777)
    chosen = [problem for problem in candidates if problem not in used][:count]
    if len(chosen) < count:
        raise RuntimeError("not enough validation problems; raise the candidate count")
    return chosen


class Run(dict):
    """One training run: ``horizon``, ``method``, ``seed``, ``split`` ("validation" or "test"), ``overrides`` (config
    fields) and ``condition`` (:data:`CONDITION_FIELDS`; empty for the plain protocol)."""

    @property
    def key(self) -> str:
        overrides = "-".join(f"{name}={value}" for name, value in sorted(self["overrides"].items()))
        key = f"h{self['horizon']}-{self['method']}-seed{self['seed']}-{self['split']}-{overrides}"
        condition = self.get("condition") or {}
        if condition:  # plain runs keep the keys they always had
            key += "-" + "-".join(f"{name}={value}" for name, value in sorted(condition.items()))
        return key


def make_run(horizon: int, method: str, seed: int, split: str, condition: dict | None = None, **overrides) -> Run:
    condition = dict(condition or {})
    unknown = set(condition) - set(CONDITION_FIELDS)
    if unknown:
        raise ValueError(f"unknown condition fields {sorted(unknown)}; expected {sorted(CONDITION_FIELDS)}")
    if condition.get("k") == 8:
        del condition["k"]  # K=8 at 64 completions per step is the plain protocol: the same run
    if not condition.get("noise", 1):
        del condition["noise"]
    if "flips" in condition:
        if condition["flips"] not in NOISE_MODES:
            raise ValueError(f"flips={condition['flips']!r}; expected one of {NOISE_MODES}")
        if "noise" not in condition:
            raise ValueError("flips without noise: a noise model needs a flip probability")
        if condition["flips"] == "independent":
            del condition["flips"]  # the paper-claims runs' model: their keys stay as they were
    return Run(horizon=horizon, method=method, seed=seed, split=split, overrides=overrides, condition=condition)


def cached_warm_start(build, config, cache_dir: str | None) -> str:
    """``build(config, cache_dir=cache_dir)`` under an exclusive file lock in the cache directory, so that two shards
    reaching a warm start that is not built yet do not both build it into the same temporary directory."""
    from gnivo_trl.synthetic import default_cache_dir

    directory = Path(cache_dir or default_cache_dir())
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f".build-{config.key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return build(config, cache_dir=cache_dir)


def execute(run: Run, work: Path, cache_dir: str | None) -> dict:
    """The cached result of ``run``, training it first if needed."""
    path = work / f"{run.key}.json"
    if path.exists():
        return json.loads(path.read_text())
    from gnivo_trl.synthetic import build_warm_start

    horizon, condition = run["horizon"], run.get("condition") or {}
    steps = protocol(horizon, 10, condition).steps
    # Validation runs are evaluated every fifth of training (the rate choice reads the last), test runs every tenth
    # (curves, the late window).
    every = steps // 5 if run["split"] == "validation" else steps // 10
    args = protocol(horizon, eval_every=max(every, 1), condition=condition)
    model_dir = cached_warm_start(build_warm_start, warm_start_config(horizon, condition.get("task")), cache_dir)
    if run["split"] == "validation":
        problems = validation_problems(horizon)
    else:
        problems = generate_problems(EVAL_PROBLEMS, "test", horizon, seed=0)
    reward = noisy_reward(chain_reward, condition, run["seed"], args.num_generations)
    result = run_one(
        run["method"],
        run["seed"],
        model_dir,
        args,
        work / "trainers" / run.key,
        overrides=run["overrides"],
        eval_problems=problems,
        reward_func=reward,
    )
    result.update(run, key=run.key)
    path.write_text(json.dumps(result))
    return result


def run_all(runs: list[Run], args, execute=execute) -> list[dict]:
    """Execute this process's shard of ``runs`` (every n-th, ``args.shard = "i/n"``), then return every cached result
    of ``runs``. ``args``: ``work_dir``, ``shard``, ``cache_dir``."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    index, count = (int(part) for part in args.shard.split("/"))
    started = time.perf_counter()
    for position, run in enumerate(runs):
        if position % count != index:
            continue
        result = execute(run, work, args.cache_dir)
        print(
            f"[{position + 1}/{len(runs)}] {run.key}: "
            + " ".join(f"{step}:{accuracy:.3f}" for step, accuracy in result["accuracy"])
            + f" ({result['seconds_total']:.0f} s; {time.perf_counter() - started:.0f} s elapsed)",
            flush=True,
        )
    return cached(runs, work)


def cached(runs: list[Run], work: Path) -> list[dict]:
    return [json.loads((work / f"{run.key}.json").read_text()) for run in runs if (work / f"{run.key}.json").exists()]


def final_accuracy(result: dict) -> float:
    return result["accuracy"][-1][1]


def late_accuracy(result: dict) -> float:
    """Mean accuracy over the evaluations in the last 20% of training (steps 80-100 of 100): less noisy than the
    final one alone."""
    last = result["accuracy"][-1][0]
    return statistics.fmean(accuracy for step, accuracy in result["accuracy"] if step >= 0.8 * last)


def choose_rate(results: dict[str, dict], grid: dict[float, list[Run]], what: str) -> float:
    """The rate of ``grid`` (rate -> its tuning runs) with the best mean final validation accuracy (ties: the smaller
    rate). ``results``: cached results by key. Refuses to choose from an incomplete grid."""
    scores = []
    for rate, runs in grid.items():
        if not all(run.key in results for run in runs):
            raise SystemExit(f"tuning grid incomplete ({what}, lr {rate:g}): run its tuning part first")
        scores.append((statistics.fmean(final_accuracy(results[run.key]) for run in runs), -rate))
    return -max(scores)[1]


def seconds(results: list[dict]) -> float:
    return sum(r["seconds_total"] for r in results)


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def paired(a: list[dict], b: list[dict], score=late_accuracy) -> list[float]:
    """``score(a) - score(b)`` for the seeds both have, in the order of ``a``."""
    other = {r["seed"]: score(r) for r in b}
    return [score(r) - other[r["seed"]] for r in a if r["seed"] in other]


def paired_cell(differences: list[float]) -> str:
    """``+d.d [+l.l, +h.h]`` in percentage points, ``–`` without two pairs."""
    if len(differences) < 2:
        return "–"
    d, low, high = paired_ci(differences)
    return f"{100 * d:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
