"""Agents: GRPO vs GN-IVO (turn and token units) vs VIMPO on the offline tool-calling task, several seeds.

The task is :mod:`gnivo_trl.agent_task`: 4-step chained arithmetic mod 10 solved by calling ``calculate(a, op, b)``
once per step through TRL's tool loop (``tools=[calculate]``), rewarded by ``tool_chain_reward`` (1.0 only when
every call has its step's operands, in order, and the boxed answer is right). Every method starts from the same
cached warm start (:func:`gnivo_trl.agent_task.build_tool_warm_start`) and follows ``benchmarks/learning.py``'s
protocol (60 steps instead of 100: this task learns fast, and at 100 steps the GN-IVO demo is at 90%, near
saturation): the same prompts per step for a given seed, 8 prompts x K=8, AdamW, constant learning rate 2e-4
(learning.py's shared rate; not tuned here), max_grad_norm 1.0, temperature 1, one optimizer step per generation
batch, at most 5 tool calls per rollout. Test accuracy: ``--eval-problems`` held-out problems solved through the same tool loop, one
sample each at temperature 1, the same problems and sampling seed at every evaluation.

Methods: ``grpo`` (TRL's defaults written out, as learning.py), ``gnivo-turn`` and ``gnivo-token`` (alpha 0.2),
``vimpo`` (beta 5e-2 and the paper's actor weight 5e-3: ``beta * L / c_A`` is about 360 at the ~36 model tokens of
an answer, far from the collapse measured in ``learning_vimpo_map.md``). Tool output is masked out of every loss.

    for i in 0 1; do python benchmarks/agent_learning.py --shard $i/2 & done; wait
    python benchmarks/agent_learning.py --report-only

Runs are cached in ``--work-dir`` (default ``.cache/agent-benchmark``): an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fair_comparison  # noqa: E402  (the learning comparison's statistics)
import learning  # noqa: E402  (GRPO's defaults and the trainer classes)

RESULTS = Path(__file__).parent / "results"
WARM_START = None  # a gnivo_trl.agent_task.ToolWarmStartConfig; None: its defaults (what the results use)

METHODS: dict[str, tuple[str, dict]] = {
    "grpo": ("grpo", learning.GRPO_DEFAULTS),
    "gnivo-turn": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="turn")),
    "gnivo-token": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="token")),
    "vimpo": ("vimpo", dict(vimpo_beta=5e-2, vimpo_actor_coeff=5e-3)),
}


def run_one(method: str, seed: int, args, output_dir: Path) -> dict:
    """Train one method from the tool warm start; its test-accuracy curve and timings."""
    from transformers import AutoTokenizer, PrinterCallback

    from gnivo_trl.agent_task import (
        ToolAccuracyCallback,
        ToolWarmStartConfig,
        build_tool_warm_start,
        calculate,
        make_tool_rl_dataset,
        tool_chain_reward,
    )
    from gnivo_trl.synthetic import generate_problems

    warm_config = WARM_START or ToolWarmStartConfig()
    model_dir = build_tool_warm_start(warm_config, cache_dir=args.cache_dir)
    family, settings = METHODS[method]
    config_cls, trainer_cls = learning.trainer_classes(family)
    # A call and its response take about 20 tokens: room for every step, its answer and a stray call.
    protocol = argparse.Namespace(**vars(args), max_completion_length=32 * (warm_config.num_steps + 1))
    shared = learning.protocol_settings(protocol, seed)
    config = config_cls(
        output_dir=str(output_dir / f"{method}-seed{seed}"),
        max_tool_calling_iterations=warm_config.num_steps + 1,  # one spare call, then it must answer
        **shared,
        **settings,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = generate_problems(args.eval_problems, "test", warm_config.num_steps, seed=0)
    callback = ToolAccuracyCallback(tokenizer, problems, every=args.eval_every, seed=1234)
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=tool_chain_reward,
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
    return {
        "method": method,
        "seed": seed,
        "accuracy": callback.history,
        "train_reward": [entry["reward"] for entry in trainer.state.log_history if "reward" in entry],
        "seconds_total": seconds,
        "seconds_training": seconds - callback.eval_seconds,
    }


def report(runs: list[dict], args, command: str) -> str:
    by_method = {m: [r for r in runs if r["method"] == m] for m in METHODS}
    final = fair_comparison.final_accuracy
    grpo = {r["seed"]: final(r) for r in by_method["grpo"]}
    lines = [
        "# Agents: GRPO vs GN-IVO vs VIMPO on the offline tool-calling task",
        "",
        f"Generated by `benchmarks/agent_learning.py` on {time.strftime('%Y-%m-%d')}. Command: `{command}` (two "
        "processes, one per core, then `--report-only`).",
        "",
        "- Task: `gnivo_trl.agent_task`, 4-step chained arithmetic mod 10 through the `calculate` tool (TRL's tool "
        "loop), reward `tool_chain_reward`. Warm start: `build_tool_warm_start()` (cached SFT).",
        f"- RL: {args.steps} optimizer steps, {args.prompts_per_step} prompts x K={args.num_generations}, AdamW, "
        f"constant learning rate {args.learning_rate} for every method (learning.py's shared rate, not tuned here), "
        "max_grad_norm 1.0, temperature 1.",
        f"- Test accuracy: {args.eval_problems} held-out problems through the tool loop, one sample each at "
        f"temperature 1, every {args.eval_every} steps; mean ± std over seeds "
        f"{', '.join(str(s) for s in sorted({r['seed'] for r in runs}))}; differences to GRPO paired by seed with "
        "95% Student t intervals.",
        "",
        "| method | seeds | step 0 | final test accuracy (%) | final − GRPO (pp) [95% CI] | CPU time per run (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method, results in by_method.items():
        if not results:
            continue
        mean, std = fair_comparison.mean_std([final(r) for r in results])
        difference = "–"
        paired = [final(r) - grpo[r["seed"]] for r in results if r["seed"] in grpo]
        if method != "grpo" and len(paired) > 1:
            d, low, high = fair_comparison.paired_ci(paired)
            difference = f"{100 * d:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
        seconds = statistics.fmean(r["seconds_total"] for r in results)
        lines.append(
            f"| {method} | {len(results)} | {100 * results[0]['accuracy'][0][1]:.1f} | {100 * mean:.1f} ± "
            f"{100 * std:.1f} | {difference} | {seconds:.0f} |"
        )
    lines += ["", "Per-seed final test accuracy (%):", ""]
    for method, results in by_method.items():
        per_seed = ", ".join(f"{r['seed']}: {100 * final(r):.1f}" for r in sorted(results, key=lambda r: r["seed"]))
        lines.append(f"- {method}: {per_seed}")
    lines += ["", "![test accuracy against step](agent_learning.png)", ""]
    lines.append(
        f"CPU time: {sum(r['seconds_total'] for r in runs) / 60:.0f} min for {len(runs)} runs (2 shared cores)."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-problems", type=int, default=300)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i")
    parser.add_argument("--report-only", action="store_true", help="write the report from the cached runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cache-dir", default=None, help="where the warm start is cached (default ~/.cache/gnivo-trl)"
    )
    parser.add_argument("--work-dir", default=".cache/agent-benchmark")
    parser.add_argument("--report", default=str(RESULTS / "agent_learning.md"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    index, count = (int(part) for part in args.shard.split("/"))
    runs = []
    position = 0
    for seed in args.seeds:
        for method in args.methods:
            key = f"{method}-seed{seed}-{args.steps}x{args.prompts_per_step}x{args.num_generations}-lr{args.learning_rate}"
            path = work / f"{key}.json"
            if not path.exists() and not args.report_only and position % count == index:
                path.write_text(json.dumps(run_one(method, seed, args, work / "trainers")))
            position += 1
            if path.exists():
                run = json.loads(path.read_text())
                runs.append(run)
                print(f"{key}: " + " ".join(f"{s}:{a:.3f}" for s, a in run["accuracy"]), flush=True)
    if args.report_only and runs:
        Path(args.report).write_text(report(runs, args, "python benchmarks/agent_learning.py"))
        groups = {m: [r for r in runs if r["method"] == m] for m in args.methods}
        learning.plot_curves(groups, Path(args.report).with_suffix(".png"), "agent task, test accuracy")
        print(Path(args.report).read_text())


if __name__ == "__main__":
    main()
