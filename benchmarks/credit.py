"""Where did it go wrong? Does a policy's implied credit locate the first wrong step of a completion?

A ProcessBench-style step-error localisation benchmark on the synthetic chained-arithmetic task
(:mod:`gnivo_trl.synthetic`), whose exact verifier labels every completion with its earliest wrong step, or none
(:func:`gnivo_trl.synthetic.earliest_wrong_step`; step ``k`` is the ``k``-th piece between ``"\\n\\n"`` delimiters,
the boxed answer the last one; steps after the first wrong one are not judged).

Policies are trained with the shared protocol (``benchmarks/protocol.py``, its ``run_one``: same warm start, prompts,
K, learning rate and number of steps per seed), and saved:

- ``grpo`` (TRL's GRPOTrainer), ``gnivo-token`` and ``gnivo-step`` (GN-IVO, alpha 0.2), and VIMPO value-only and
  with the actor at both betas of the learning study (``vimpo-b5e-4-c0``, ``vimpo-b5e-4-c5e-3``, ``vimpo-b5e-2-c0``,
  ``vimpo-b5e-2-c5e-3``), all at the learning study's shared rate 2e-4;
- ``gnivo-token@0.0004`` and ``gnivo-step@0.0004``: GN-IVO again at the rate ``benchmarks/fair_comparison.py`` chose
  for it on validation (``results/fair_comparison/learning_tuning.md``); GRPO's and VIMPO's (beta 5e-2) chosen rate is 2e-4, so
  every method is also read at its tuned rate. ``--methods`` takes any ``METHOD@RATE``.

Completions. For each seed, the warm start samples one completion (temperature 1, as in training) for each of
``--validation-problems + --test-problems`` held-out problems (the test split of the task, never trained on; the
first ones are the validation split, the rest the test split). **Every readout scores this same pool** (as
ProcessBench scores a fixed set of solutions with every model), so readouts differ only in how they judge the steps,
not in which completions they judge. A second table scores each policy on its own samples of the same problems.

Readouts. Each trained policy is scored against the warm start (its reference) with :mod:`gnivo_trl.credit` (TRL's
kernels, exact KL). A step's credit is the sum over its tokens of

- ``log-ratio``: ``log pi_theta - log pi_ref`` (the implicit process reward), or
- ``log-ratio - KL``: the same minus the exact ``KL(pi_theta || pi_ref)`` at each position (VIMPO's centring).

The readout predicts the earliest step whose credit falls below a threshold, or "no error" when none does; the
threshold maximises F1 on the validation split and is then applied unchanged to the test split. Baselines: a random
step (predict "no error" with the validation split's share of correct completions, else a uniformly random step),
always "no error", and the warm start without RL. The warm start is its own reference, so its log-ratio readouts are
identically 0; its baseline is its own step log-likelihood (``log pi_ref`` summed over the step), the same threshold
rule. Each policy's own step log-likelihood is reported too (``log-prob``), as a likelihood control.

Metrics (on the test split): accuracy on erroneous completions (the predicted step is the labelled one), accuracy on
correct completions (predicted "no error"), their harmonic mean F1 (ProcessBench's), and the AUROC of step credit
for wrong steps (each erroneous completion's labelled step) against correct steps (the steps before it, and every
step of a correct completion), lower credit meaning "wrong". Mean and sample std over seeds; differences from GRPO
are paired by seed and readout.

The defaults are the shared CPU protocol: 5 seeds, 100 optimizer steps of 8 prompts x K=8 at its shared learning
rate 2e-4 (plus the two tuned-rate GN-IVO policies above), 4-step problems, and the warm start fine-tuned on 24,000
SFT examples (the :class:`gnivo_trl.synthetic.WarmStartConfig` default). ``--steps 60 --warm-start-examples 12000`` is the smaller
first run, whose results are archived in ``results/archive/credit_weak_warm_start.md``; ``--steps 300 --methods grpo
gnivo-step vimpo-b5e-2-c0`` (with ``--report/--plot/--example`` under ``results/credit/credit_300_steps*``) is the
longer-training check. Results go to ``benchmarks/results/credit/``.
A rerun regenerates the tables and keeps a report's hand-written title, quoted introduction and ``## Reading``
section.

Command (CPU, one torch thread per process; runs, pools and scores are cached under ``--work-dir``, ignored by git,
so an interrupted benchmark resumes, and several processes may share it, e.g. workers training disjoint
``--methods`` with ``--train-only`` before one plain invocation scores and reports)::

    python -m benchmarks.credit
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import protocol, reporting  # noqa: E402  (the shared training protocol)
from gnivo_trl.synthetic import (  # noqa: E402
    WARM_START_MARKER,
    build_warm_start,
    earliest_wrong_step,
    generate_problems,
    solution_text,
)

STUDY = "credit"
RESULTS = reporting.RESULTS / STUDY
METHODS = [
    "grpo",
    "gnivo-token",
    "gnivo-step",
    "vimpo-b5e-4-c0",
    "vimpo-b5e-4-c5e-3",
    "vimpo-b5e-2-c0",
    "vimpo-b5e-2-c5e-3",
    # GN-IVO again at the rate benchmarks/fair_comparison.py tuned for it on validation (results/fair_comparison/learning_tuning.md,
    # 4-step problems); every other method's tuned rate there is the shared 2e-4 already.
    "gnivo-token@0.0004",
    "gnivo-step@0.0004",
]
READOUT_LABELS = {"log_ratio": "log-ratio", "centred": "log-ratio - KL", "log_prob": "log-prob"}
WARM_START = "warm-start"
POOLS = {"warm": "the warm start's completions (shared by every readout)", "own": "each policy's own completions"}


# --------------------------------------------------------------------------------------------------------------------
# Training (the shared protocol) and sampling
# --------------------------------------------------------------------------------------------------------------------


def policy_spec(policy: str) -> tuple[str, float | None]:
    """A policy is a method of ``protocol.METHODS``, optionally at its own learning rate: ``"gnivo-step"`` or
    ``"gnivo-step@0.0004"`` (``--learning-rate`` otherwise)."""
    method, _, rate = policy.partition("@")
    return method, (float(rate) if rate else None)


def policy_name(text: str) -> str:
    """argparse type of ``--methods``: a known method, optionally ``@`` a positive learning rate."""
    method, at, rate = text.partition("@")
    if method not in protocol.METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {method!r}; choose from {', '.join(sorted(protocol.METHODS))}"
        )
    try:
        valid_rate = not at or float(rate) > 0
    except ValueError:
        valid_rate = False
    if not valid_rate:
        raise argparse.ArgumentTypeError(f"{text!r}: the learning rate after '@' must be a positive number, e.g. 4e-4")
    return text


def run_key(policy: str, seed: int, args) -> str:
    method, rate = policy_spec(policy)
    learning_rate = args.learning_rate if rate is None else rate
    return f"{method}-seed{seed}-{args.steps}x{args.prompts_per_step}x{args.num_generations}-lr{learning_rate}"


def train_policy(policy: str, seed: int, model_dir: str, args, model_out: Path) -> dict:
    """``protocol.run_one`` (the shared protocol's training, unchanged but for the policy's own learning rate, if
    it has one), keeping the trained model in ``model_out``."""
    method, rate = policy_spec(policy)
    overrides = None if rate is None else {"learning_rate": rate}
    trainers = Path(args.work_dir) / "trainers" / model_out.name  # one trainer directory per run (workers may share)
    return protocol.run_one(method, seed, model_dir, args, trainers, overrides=overrides, save_to=model_out)


def load_model(directory: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


def sample_completions(model, tokenizer, problems: list[str], seed: int) -> list[list[int]]:
    """One completion per problem, sampled as :func:`gnivo_trl.synthetic.evaluate_accuracy` samples (chat template,
    temperature 1, no top-k/top-p, the same length limit), with :func:`gnivo_trl.credit.sample_completions`: token
    ids up to and including EOS."""
    from gnivo_trl.credit import sample_completions as sample

    max_new_tokens = max(len(tokenizer(solution_text(p))["input_ids"]) for p in problems) + 4
    prompts = [[{"role": "user", "content": p}] for p in problems]
    return sample(model, tokenizer, prompts, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed, batch_size=256)


def label_pool(problems: list[str], completions: list[list[int]], tokenizer) -> list[dict]:
    """Each completion's text (its tokens' texts, the final EOS left out) and earliest wrong step (None if right)."""
    from gnivo_trl.steps import TokenTextCache

    texts = TokenTextCache(tokenizer)
    rows = []
    for problem, ids in zip(problems, completions, strict=True):
        body = ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids
        text = "".join(texts(body))
        rows.append({"problem": problem, "ids": ids, "text": text, "label": earliest_wrong_step(problem, text)})
    return rows


def score_pool(policy, reference, tokenizer, pool: list[dict]) -> list[dict]:
    """Per-step credit of every completion of ``pool`` under each readout (lists of floats, nats)."""
    from gnivo_trl.credit import READOUTS, readout_token_values, score_completions, step_credit

    prompts = [[{"role": "user", "content": row["problem"]}] for row in pool]
    scores = score_completions(policy, reference, tokenizer, prompts, [row["ids"] for row in pool], batch_size=128)
    per_row = [{"credit": {}} for _ in pool]
    for readout in READOUTS:
        credit = step_credit(readout_token_values(scores, readout), scores.mask, scores.step_ends)
        for index, row in enumerate(per_row):
            row["credit"][readout] = credit.step_totals[index, : int(credit.num_steps[index])].tolist()
    return per_row


# --------------------------------------------------------------------------------------------------------------------
# Localisation metrics (pure Python / numpy)
# --------------------------------------------------------------------------------------------------------------------


def aligned_labels(labels: list[int | None], credits: list[list[float]]) -> list[int | None]:
    """Labels clamped to each completion's number of scored steps.

    A completion cut off by the length limit right after a delimiter has an empty last piece that no token closes;
    its error (the missing rest) is then placed on its last scored step.
    """
    return [
        None if label is None else min(label, len(steps) - 1) for label, steps in zip(labels, credits, strict=True)
    ]


def _padded(credits: list[list[float]]):
    width = max((len(c) for c in credits), default=1)
    array = np.full((len(credits), max(width, 1)), np.inf)  # +inf never falls below a threshold
    for row, steps in enumerate(credits):
        array[row, : len(steps)] = steps
    return array


def predict_first_below(credits: list[list[float]], thresholds) -> np.ndarray:
    """``(K, N)`` predicted earliest wrong step per threshold and completion: the first step with credit < threshold,
    -1 for "no error"."""
    array = _padded(credits)
    below = array[None, :, :] < np.asarray(thresholds, dtype=float)[:, None, None]
    return np.where(below.any(axis=2), below.argmax(axis=2), -1)


def localisation(predictions, labels: list[int | None]) -> dict:
    """ProcessBench's accuracies on erroneous and correct completions, and their harmonic mean (F1)."""
    truth = np.array([-1 if label is None else label for label in labels])
    predictions = np.asarray(predictions)
    erroneous, correct = truth >= 0, truth < 0
    error_accuracy = float((predictions[erroneous] == truth[erroneous]).mean()) if erroneous.any() else float("nan")
    correct_accuracy = float((predictions[correct] == -1).mean()) if correct.any() else float("nan")
    total = error_accuracy + correct_accuracy
    f1 = 2 * error_accuracy * correct_accuracy / total if total > 0 else 0.0
    return {"error_accuracy": error_accuracy, "correct_accuracy": correct_accuracy, "f1": f1}


def choose_threshold(credits: list[list[float]], labels: list[int | None], max_candidates: int = 512) -> float:
    """The threshold that maximises F1 on (validation) ``credits``; ties go to the lowest threshold.

    Candidates: -inf (always "no error"), +inf (always the first step), and up to ``max_candidates`` quantiles of
    the step credits (each used as "credit < value").
    """
    values = np.unique(np.concatenate([np.asarray(c, dtype=float) for c in credits if c] or [np.zeros(0)]))
    if values.size > max_candidates:
        values = np.unique(np.quantile(values, np.linspace(0, 1, max_candidates)))
    candidates = np.concatenate([[-np.inf], values, [np.inf]])
    predictions = predict_first_below(credits, candidates)
    f1 = [localisation(row, labels)["f1"] for row in predictions]
    return float(candidates[int(np.argmax(f1))])


def step_auroc(credits: list[list[float]], labels: list[int | None]) -> float:
    """AUROC of ``-credit`` for wrong steps (the labelled step) against correct steps (those before it, and every
    step of a correct completion); ties count one half (Mann-Whitney)."""
    wrong, right = [], []
    for steps, label in zip(credits, labels, strict=True):
        if label is None:
            right.extend(steps)
        else:
            right.extend(steps[:label])
            wrong.append(steps[label])
    if not wrong or not right:
        return float("nan")
    scores = -np.concatenate([wrong, right])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    rank_sum = ranks[: len(wrong)].sum()
    return float((rank_sum - len(wrong) * (len(wrong) + 1) / 2) / (len(wrong) * len(right)))


def evaluate_readout(validation: list[dict], test: list[dict], readout: str) -> dict:
    """Threshold on ``validation``, metrics on ``test``; each row holds ``credit[readout]`` and ``label``."""
    val_credits = [row["credit"][readout] for row in validation]
    test_credits = [row["credit"][readout] for row in test]
    val_labels = aligned_labels([row["label"] for row in validation], val_credits)
    test_labels = aligned_labels([row["label"] for row in test], test_credits)
    threshold = choose_threshold(val_credits, val_labels)
    predictions = predict_first_below(test_credits, [threshold])[0]
    return {
        **localisation(predictions, test_labels),
        "auroc": step_auroc(test_credits, test_labels),
        "threshold": threshold,
    }


def baseline_metrics(validation: list[dict], test: list[dict], seed: int) -> dict[str, dict]:
    """Random step and always "no error", on the scored steps of the warm start's pool."""
    credits = [row["credit"]["log_prob"] for row in test]
    labels = aligned_labels([row["label"] for row in test], credits)
    correct_share = statistics.fmean(row["label"] is None for row in validation)
    rng = random.Random(f"credit-benchmark/random/{seed}")
    random_predictions = [-1 if rng.random() < correct_share else rng.randrange(len(c)) for c in credits]
    random_scores = [[rng.random() for _ in c] for c in credits]
    return {
        "random step": {**localisation(random_predictions, labels), "auroc": step_auroc(random_scores, labels)},
        "always no error": {**localisation(np.full(len(labels), -1), labels), "auroc": 0.5},
    }


# --------------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    preset = protocol.PRESETS["cpu"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        type=policy_name,
        default=METHODS,
        metavar="METHOD[@LR]",
        help=f"methods ({', '.join(sorted(protocol.METHODS))}), each optionally at its own learning "
        "rate, e.g. gnivo-step@4e-4",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (the protocol: 100)")
    parser.add_argument("--prompts-per-step", type=int, default=preset["prompts_per_step"])
    parser.add_argument("--num-generations", type=int, default=preset["num_generations"])
    parser.add_argument("--learning-rate", type=float, default=preset["learning_rate"])
    parser.add_argument("--num-steps", type=int, default=preset["num_steps"], help="reasoning steps per problem")
    parser.add_argument("--train-problems", type=int, default=4096)
    parser.add_argument("--max-completion-length", type=int, default=48)
    parser.add_argument("--eval-problems", type=int, default=200, help="test accuracy before/after training")
    parser.add_argument("--validation-problems", type=int, default=300, help="held-out problems to pick thresholds")
    parser.add_argument("--test-problems", type=int, default=500, help="held-out problems to report on")
    parser.add_argument("--warm-start-hidden", type=int, default=None)
    parser.add_argument("--warm-start-layers", type=int, default=None)
    parser.add_argument(
        "--warm-start-examples", type=int, default=24000, help="SFT examples of the warm start (the protocol: 24,000)"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="where the warm start is cached (default ~/.cache/gnivo-trl)"
    )
    parser.add_argument("--work-dir", default=".cache/credit-benchmark", help="cached runs, pools and scores")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--train-only", action="store_true", help="train (and cache) the policies, nothing else")
    parser.add_argument(
        "--no-own-samples", dest="own_samples", action="store_false", help="skip the secondary table (own samples)"
    )
    parser.add_argument("--report", default=str(RESULTS / "credit.md"))
    parser.add_argument("--plot", default=str(RESULTS / "credit.png"))
    parser.add_argument("--example", default=str(RESULTS / "credit_example"), help="example .html/.png path stem")
    args = parser.parse_args(argv)
    args.eval_every = args.steps  # protocol.run_one's accuracy check: before training and at the end only
    if "grpo" not in args.methods and not args.train_only:
        args.methods.insert(0, "grpo")  # the central comparison is against GRPO (workers may train a subset)
    return args


def _cached_json(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value))
    temporary.replace(path)  # a concurrent reader never sees half a file
    return value


def pool_problems(seed: int, args) -> tuple[list[str], list[str]]:
    """Held-out (test-split) validation and test problems of one seed, disjoint."""
    problems = generate_problems(
        args.validation_problems + args.test_problems, "test", args.num_steps, seed=10_000 + seed
    )
    return problems[: args.validation_problems], problems[args.validation_problems :]


def run_seed(seed: int, args, model_dir: str, work: Path, log) -> dict:
    """Train (cached) every method of one seed, sample and label the pools, score every readout; per-seed metrics."""
    from transformers import AutoTokenizer

    from gnivo_trl.credit import prepare_for_scoring

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    runs = {}
    for method in args.methods:
        key = run_key(method, seed, args)
        model_out = work / "models" / key
        path = work / "runs" / f"{key}.json"
        if not (path.exists() and (model_out / "config.json").exists()):
            path.unlink(missing_ok=True)
        started = time.perf_counter()
        runs[method] = _cached_json(path, lambda m=method, o=model_out: train_policy(m, seed, model_dir, args, o))
        accuracy = " -> ".join(f"{a:.3f}" for _, a in runs[method]["accuracy"])
        log(f"seed {seed} {method}: test accuracy {accuracy} ({time.perf_counter() - started:.0f} s)")
    if args.train_only:
        return {"runs": runs}

    validation_problems, test_problems = pool_problems(seed, args)
    problems = validation_problems + test_problems
    warm = prepare_for_scoring(load_model(model_dir))
    pool_tag = f"seed{seed}-{args.validation_problems}+{args.test_problems}"

    def pool_of(model, name: str) -> list[dict]:
        return _cached_json(
            work / "pools" / f"{name}-{pool_tag}.json",
            lambda: label_pool(problems, sample_completions(model, tokenizer, problems, seed), tokenizer),
        )

    warm_pool = pool_of(warm, "warm-start")
    readouts = {}
    warm_scores = _cached_json(
        work / "scores" / f"warm-start-on-warm-start-{pool_tag}.json",
        lambda: score_pool(warm, warm, tokenizer, warm_pool),
    )
    readouts[(WARM_START, "warm")] = warm_scores
    for method in args.methods:
        key = run_key(method, seed, args)
        policy = prepare_for_scoring(load_model(str(work / "models" / key)))
        readouts[(method, "warm")] = _cached_json(
            work / "scores" / f"{key}-on-warm-start-{pool_tag}.json",
            lambda p=policy: score_pool(p, warm, tokenizer, warm_pool),
        )
        if args.own_samples:
            own_pool = pool_of(policy, key)
            readouts[(method, "own")] = _cached_json(
                work / "scores" / f"{key}-on-own-{pool_tag}.json",
                lambda p=policy, o=own_pool: score_pool(p, warm, tokenizer, o),
            )
            readouts[(method, "own-pool")] = own_pool

    def with_labels(scores: list[dict], pool: list[dict]) -> list[dict]:
        return [{**score, "label": row["label"]} for score, row in zip(scores, pool, strict=True)]

    n_val = len(validation_problems)
    metrics: dict[str, dict] = {}
    warm_rows = with_labels(warm_scores, warm_pool)
    for name, value in baseline_metrics(warm_rows[:n_val], warm_rows[n_val:], seed).items():
        metrics[f"warm|{name}|-"] = value
    metrics[f"warm|{WARM_START}|log_prob"] = evaluate_readout(warm_rows[:n_val], warm_rows[n_val:], "log_prob")
    for method in args.methods:
        for pool_name in ("warm", "own") if args.own_samples else ("warm",):
            pool = warm_pool if pool_name == "warm" else readouts[(method, "own-pool")]
            rows = with_labels(readouts[(method, pool_name)], pool)
            for readout in ("log_ratio", "centred", "log_prob"):
                metrics[f"{pool_name}|{method}|{readout}"] = evaluate_readout(rows[:n_val], rows[n_val:], readout)
        if not args.own_samples:
            continue
        own_test = readouts[(method, "own-pool")][n_val:]
        metrics[f"own|{method}|-"] = {"error_share": statistics.fmean(row["label"] is not None for row in own_test)}
    warm_test = warm_pool[n_val:]
    metrics[f"warm|{WARM_START}|-"] = {"error_share": statistics.fmean(row["label"] is not None for row in warm_test)}
    return {"runs": runs, "metrics": metrics, "example": example_row(warm_pool[n_val:], n_val)}


def example_row(test_pool: list[dict], n_val: int) -> dict:
    """The first erroneous test completion of the pool (in problem order, no other selection) and its credits."""
    index = next((i for i, row in enumerate(test_pool) if row["label"] is not None), 0)
    row = test_pool[index]
    return {
        "problem": row["problem"],
        "text": row["text"],
        "label": row["label"],
        "pool_index": n_val + index,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return float("nan"), float("nan")
    return protocol.mean_std(values)


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = _mean_std(values)
    if mean != mean:
        return "–"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def summarize(per_seed: dict[int, dict], args, command: str, warm_start: dict, wall_minutes: float) -> str:
    seeds = sorted(per_seed)
    metrics = {seed: per_seed[seed]["metrics"] for seed in seeds}

    def values(key: str, field: str) -> list[float]:
        return [metrics[s][key][field] for s in seeds if key in metrics[s] and field in metrics[s][key]]

    def paired(key: str, base: str, field: str) -> str:
        diffs = [metrics[s][key][field] - metrics[s][base][field] for s in seeds if key in metrics[s]]
        diffs = [d for d in diffs if d == d]  # NaN when a split had no wrong (or no correct) step
        if not diffs:
            return "–"
        mean, low, high = protocol.paired_ci(diffs)
        interval = f" [{100 * low:+.1f}, {100 * high:+.1f}]" if low == low else ""
        return f"{100 * mean:+.1f}{interval} ({sum(d > 0 for d in diffs)}/{len(diffs)})"

    runs = {m: [per_seed[s]["runs"][m] for s in seeds] for m in args.methods}
    lines = [
        "# Where did it go wrong? Step-error localisation by implied credit",
        "",
        f"Generated by `benchmarks/credit.py` on {time.strftime('%Y-%m-%d')}. Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- Task: {args.num_steps}-step chained arithmetic mod 10 (`gnivo_trl.synthetic`); the exact verifier labels each "
        "completion with its earliest wrong step (`earliest_wrong_step`: one step per line, the boxed answer is the "
        "last step) or none.",
        f"- Policies: trained by the shared protocol's `run_one` (`benchmarks/protocol.py`) from a warm start fine-tuned on "
        f"{warm_start['config']['num_examples']:,} SFT examples (the protocol's: 24,000), which solves "
        f"{warm_start['test_accuracy_t1_256']:.1%} of 256 test problems at T=1: {args.steps} optimizer steps "
        "(the protocol's: 100), "
        f"{args.prompts_per_step} prompts x K={args.num_generations}, learning rate {args.learning_rate} "
        "(`METHOD@RATE`: at that rate instead; `@0.0004` is GN-IVO's rate tuned on validation by "
        f"`python -m benchmarks.fair_comparison`, `fair_comparison/learning_tuning.md`), seeds {', '.join(map(str, seeds))}.",
        f"- Completions: per seed, one sample at T=1 from the warm start for each of {args.validation_problems} "
        f"validation and {args.test_problems} test problems (held-out split, never trained on); every readout scores "
        "these same completions. Secondary table: each policy's own samples of the same problems.",
        "- Readout: a step's credit is the sum over its tokens of `log pi_theta - log pi_ref` (log-ratio) or of that "
        "minus the exact `KL(pi_theta || pi_ref)` (log-ratio - KL), the reference being the warm start; the "
        "prediction is the earliest step whose credit is below a threshold chosen for the best F1 on the validation "
        "split (never on test), else 'no error'. `log-prob` sums `log pi_theta` instead (a likelihood control).",
        "- Metrics on the test split: accuracy on erroneous completions (exact step), accuracy on correct ones, F1 = "
        "their harmonic mean (ProcessBench), and the AUROC of step credit separating wrong steps (the labelled one) "
        "from correct steps (those before it, all steps of correct completions). Mean ± sample std over seeds, in %.",
        "",
    ]
    error_share = values(f"warm|{WARM_START}|-", "error_share")
    lines += [
        f"## Main table: the warm start's completions ({_cell(error_share)} % erroneous)",
        "",
        "| readout | policy | error acc. | correct acc. | F1 | AUROC | F1 minus GRPO, paired [95% CI] (wins) | "
        "AUROC minus GRPO, paired [95% CI] (wins) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("random step", "always no error"):
        key = f"warm|{name}|-"
        lines.append(
            f"| baseline | {name} | {_cell(values(key, 'error_accuracy'))} | {_cell(values(key, 'correct_accuracy'))} | "
            f"{_cell(values(key, 'f1'))} | {_cell(values(key, 'auroc'))} | | |"
        )
    key = f"warm|{WARM_START}|log_prob"
    lines.append(
        f"| log-prob | warm start (no RL) | {_cell(values(key, 'error_accuracy'))} | "
        f"{_cell(values(key, 'correct_accuracy'))} | {_cell(values(key, 'f1'))} | {_cell(values(key, 'auroc'))} | | |"
    )
    for readout in ("log_ratio", "centred", "log_prob"):
        for method in args.methods:
            key = f"warm|{method}|{readout}"
            base = f"warm|grpo|{readout}"
            lines.append(
                f"| {READOUT_LABELS[readout]} | {method} | {_cell(values(key, 'error_accuracy'))} | "
                f"{_cell(values(key, 'correct_accuracy'))} | {_cell(values(key, 'f1'))} | "
                f"{_cell(values(key, 'auroc'))} | {paired(key, base, 'f1') if method != 'grpo' else '–'} | "
                f"{paired(key, base, 'auroc') if method != 'grpo' else '–'} |"
            )
    lines += [
        "",
        "The warm start's log-ratio readouts are identically 0 (it is its own reference), so they predict the same "
        "step for every completion; its row uses its step log-likelihood instead. Paired differences are in points, "
        "paired by seed and readout, with a two-sided 95% Student-t interval over the seeds; 'wins': seeds on which the "
        "policy's number is above GRPO's with the same readout.",
        "",
        "## Secondary table: each policy reads its own completions"
        + ("" if args.own_samples else " (not run: `--no-own-samples`)"),
        "",
        "| readout | policy | erroneous (%) | error acc. | correct acc. | F1 | AUROC | F1 minus GRPO, paired [95% CI] (wins) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for readout in ("log_ratio", "centred", "log_prob") if args.own_samples else ():
        for method in args.methods:
            key = f"own|{method}|{readout}"
            lines.append(
                f"| {READOUT_LABELS[readout]} | {method} | {_cell(values(f'own|{method}|-', 'error_share'))} | "
                f"{_cell(values(key, 'error_accuracy'))} | {_cell(values(key, 'correct_accuracy'))} | "
                f"{_cell(values(key, 'f1'))} | {_cell(values(key, 'auroc'))} | "
                f"{paired(key, f'own|grpo|{readout}', 'f1') if method != 'grpo' else '–'} |"
            )
    lines += [
        "",
        "Each policy's own completions differ in number and kind of errors, so these rows are not a comparison "
        "between policies on equal terms (the paired column pairs seeds, not completions); the main table is."
        if args.own_samples
        else "Not run in this invocation (`--no-own-samples`, to fit the CPU budget).",
        "",
        "## The trained policies (sanity check against the learning study's shared-rate runs)",
        "",
        f"One sample at T=1 on {args.eval_problems} test problems (the protocol's `AccuracyCallback`).",
        "",
        "| policy | test accuracy before (%) | after (%) |",
        "|---|---|---|",
    ]
    for method in args.methods:
        before = [r["accuracy"][0][1] for r in runs[method]]
        after = [r["accuracy"][-1][1] for r in runs[method]]
        lines.append(f"| {method} | {_cell(before)} | {_cell(after)} |")
    lines += [
        "",
        f"![F1 and AUROC per policy and readout]({Path(args.plot).name})",
        "",
        f"Example (rendered, not selected: the first erroneous test completion of seed {seeds[0]}'s pool): "
        f"[{Path(args.example).name}.html]({Path(args.example).name}.html), "
        f"![example]({Path(args.example).name}.png)",
        "",
        f"Wall time: {wall_minutes:.1f} min for this invocation (cached runs, pools and scores are reused); training "
        f"time per run is in the cached run records. 2 CPU cores shared with other jobs, {args.threads} torch thread.",
        "",
    ]
    return "\n".join(lines)


def plot(per_seed: dict[int, dict], args, path: Path) -> None:
    """F1 and AUROC (mean ± std over seeds) per policy and readout on the warm start's completions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(per_seed)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, field, title in ((axes[0], "f1", "F1 (test)"), (axes[1], "auroc", "step AUROC (test)")):
        width = 0.27
        for offset, readout in enumerate(("log_ratio", "centred", "log_prob")):
            means, stds = [], []
            for method in args.methods:
                mean, std = _mean_std([per_seed[s]["metrics"][f"warm|{method}|{readout}"][field] for s in seeds])
                means.append(100 * mean)
                stds.append(100 * std)
            positions = [i + (offset - 1) * width for i in range(len(args.methods))]
            axis.bar(positions, means, width, yerr=stds, capsize=2, label=READOUT_LABELS[readout])
        for name, style in ((f"warm|{WARM_START}|log_prob", "--"), ("warm|random step|-", ":")):
            mean, _ = _mean_std([per_seed[s]["metrics"][name][field] for s in seeds])
            label = "warm start log-prob" if WARM_START in name else "random step"
            axis.axhline(100 * mean, linestyle=style, color="black", linewidth=1, label=label)
        axis.set_xticks(range(len(args.methods)), args.methods, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("%")
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Step-error localisation on the warm start's completions, {len(seeds)} seeds")
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the bars
    fig.savefig(path, dpi=110, metadata=reporting.png_metadata())
    plt.close(fig)


def example_title(problem: str, label: int) -> str:
    """The example's heading: the problem, the verifier's first wrong step (0-based ``label``) and the correct
    solution, its steps separated by semicolons (as a reader writes them, not as a Python string)."""
    steps = "; ".join(solution_text(problem).split("\n\n"))
    return f"{problem}: the first wrong step is step {label + 1} (verifier); correct solution: {steps}"


def render_example(per_seed: dict[int, dict], args, model_dir: str, work: Path) -> None:
    """The example completion of the first seed, rendered under GRPO, GN-IVO (step) and VIMPO (value only, beta
    5e-2) where they were run: ``<example>.html`` and ``<example>.png``."""
    from transformers import AutoTokenizer

    from gnivo_trl.credit import completion_credit, prepare_for_scoring, render_html, render_png, score_completions

    seed = sorted(per_seed)[0]
    example = per_seed[seed]["example"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    warm = prepare_for_scoring(load_model(model_dir))
    pool = json.loads(
        (work / "pools" / f"warm-start-seed{seed}-{args.validation_problems}+{args.test_problems}.json").read_text()
    )
    ids = pool[example["pool_index"]]["ids"]
    prompt = [{"role": "user", "content": example["problem"]}]
    wanted = [("grpo", "log_ratio"), ("gnivo-step", "log_ratio"), ("vimpo-b5e-2-c0", "centred")]
    examples = []
    for method, readout in wanted:
        if method not in args.methods:
            continue
        policy = prepare_for_scoring(load_model(str(work / "models" / run_key(method, seed, args))))
        scores = score_completions(policy, warm, tokenizer, [prompt], [ids])
        examples.append(completion_credit(scores, 0, readout, label=f"{method} (seed {seed})"))
    label = example["label"]
    title = example_title(example["problem"], label)
    Path(args.example).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.example}.html").write_text(render_html(examples, title), encoding="utf-8")
    render_png(examples, f"{args.example}.png", title=f"{example['problem']}: first wrong step is step {label + 1}")


READING_HEADING = "## Reading"


def keep_hand_written(report: Path, generated: str) -> str:
    """``generated`` with what a person wrote into the existing ``report`` kept: its title line (a follow-up report
    names its own question), a quoted introduction (the ``> `` lines between the title and "Generated by") and the
    ``## Reading`` section at the end. So a rerun regenerates the tables without deleting the interpretation."""
    if not report.exists():
        return generated
    text = report.read_text()
    head, reading_start = text, text.find(f"\n{READING_HEADING}")
    if reading_start >= 0:
        head = text[:reading_start]
    title, _, generated_rest = generated.partition("\n")
    old_title = head.partition("\n")[0]
    if old_title.startswith("# "):
        title = old_title
    intro = [line for line in head.split("Generated by", 1)[0].splitlines() if line.startswith(">")]
    if intro:
        generated_rest = generated_rest.replace("\nGenerated by", "\n" + "\n".join(intro) + "\n\nGenerated by", 1)
    return f"{title}\n{generated_rest}" + ("" if reading_start < 0 else text[reading_start:])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    reporting.provenance()  # the code this process runs, recorded now: later commits do not change it
    import torch

    torch.set_num_threads(args.threads)  # one thread per process: a tiny model only thrashes with more
    command = "python -m benchmarks.credit" + (" " + shlex.join(argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    model_dir = build_warm_start(protocol.warm_start_config_from_args(args), cache_dir=args.cache_dir)
    warm_start = json.loads((Path(model_dir) / WARM_START_MARKER).read_text())
    work = Path(args.work_dir) / Path(model_dir).name  # runs of another warm start are never reused

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", flush=True)

    per_seed = {seed: run_seed(seed, args, model_dir, work, log) for seed in args.seeds}
    if args.train_only:
        return per_seed
    report = summarize(per_seed, args, command.strip(), warm_start, (time.perf_counter() - started) / 60)
    runs = [run for seed in per_seed.values() for run in seed["runs"].values()]
    reporting.write_report(args.report, keep_hand_written(Path(args.report), report), runs)
    plot(per_seed, args, Path(args.plot))
    render_example(per_seed, args, model_dir, work)
    (work / "metrics.json").write_text(json.dumps({str(s): per_seed[s]["metrics"] for s in per_seed}, indent=1))
    print(report)
    return per_seed


if __name__ == "__main__":
    main()
    sys.exit(0)
