"""``make demo``: GN-IVO end to end on an embedded offline default, with nothing to download.

A tiny Qwen2-architecture model (built in process, random weights) learns a toy preference: completions that contain
more of the digit ``7`` score higher. The reward is verifiable and the model can move towards it within a few dozen
steps on two CPU cores, so the demo shows the whole loop working (generation, rewards, group weights, the GN-IVO
loss, optimizer steps, logging, saving) and the mean reward rising. It is a smoke demonstration, not evidence that
GN-IVO beats GRPO: that needs a task with real reasoning steps (see ``benchmarks/``).

Usage::

    python -m gnivo_trl.demo --output-dir demo_output [--steps 40] [--prefix-unit token]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import testing  # noqa: F401  (offline environment variables before TRL is imported)
from .testing import save_tiny_model, tiny_prompt_dataset

__all__ = ["main", "sevens_reward"]


def sevens_reward(completions, **kwargs) -> list[float]:
    """Share of the characters of each completion that are the digit 7 (TRL reward-function convention)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [text.count("7") / max(len(text), 1) for text in texts]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--prefix-unit", default="token", choices=["token", "step", "sequence"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from gnivo_trl import GNIVOConfig, GNIVOTrainer

    output_dir = Path(args.output_dir)
    started = time.perf_counter()
    model_dir = save_tiny_model(output_dir / "initial-model", seed=args.seed, hidden_size=32, intermediate_size=64)
    config = GNIVOConfig(
        output_dir=str(output_dir / "run"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        num_generations=4,
        per_device_train_batch_size=16,
        max_completion_length=16,
        max_steps=args.steps,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        gnivo_alpha=0.2,
        gnivo_prefix_unit=args.prefix_unit,
        disable_tqdm=True,
    )
    trainer = GNIVOTrainer(
        model=model_dir, reward_funcs=sevens_reward, args=config, train_dataset=tiny_prompt_dataset(64)
    )
    print(
        f"GN-IVO demo: tiny model ({sum(p.numel() for p in trainer.model.parameters()):,} parameters), "
        f"K={config.num_generations}, alpha={config.gnivo_alpha}, prefix unit {config.gnivo_prefix_unit!r}, "
        f"{args.steps} steps on CPU",
        flush=True,
    )
    trainer.train()

    history = [entry for entry in trainer.state.log_history if "reward" in entry and "gnivo/loss" in entry]
    rewards = [entry["reward"] for entry in history]
    window = max(len(rewards) // 5, 1)
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    # With one optimizer step per generation batch the group softmax is uniform at the sampling point, so the loss
    # value is log K whatever the rewards; its gradient, (1/K - w_i) per prefix, is what moves the policy.
    print("\nstep  reward  gnivo/loss  weight_entropy   (loss = log K at the sampling point; the gradient moves)")
    for entry in history:
        print(
            f"{entry['step']:>4}  {entry['reward']:.3f}   {entry['gnivo/loss']:9.4f}   {entry['gnivo/weight_entropy']:.3f}"
        )
    trainer.save_model(str(output_dir / "model"))
    summary = {
        "steps": args.steps,
        "mean_reward_first_steps": first,
        "mean_reward_last_steps": last,
        "window": window,
        "seconds": time.perf_counter() - started,
        "model_dir": str(output_dir / "model"),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nMean reward over the first {window} steps: {first:.3f}; over the last {window}: {last:.3f} "
        f"({'rose' if last > first else 'did not rise'}). Trained model saved to {summary['model_dir']}; "
        f"took {summary['seconds']:.0f} s."
    )
    return summary


if __name__ == "__main__":
    main()
