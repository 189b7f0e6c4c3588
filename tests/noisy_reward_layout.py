"""Train GRPO for a few steps with a group-flipped reward and save, per step, the rewards TRL gathered (rank 0).

Launched by ``tests/test_rewards.py`` on two gloo processes as
``python -m torch.distributed.run --nproc_per_node 2 tests/noisy_reward_layout.py MODEL_DIR OUT PER_DEVICE``, and on
one process without the launcher. Two reward functions: ``NoisyReward`` around a 0/1 reward (weight 1) and the same
reward exact (weight 0), so each gathered row holds its noisy and its clean reward side by side, in TRL's own group
layout. Generation is stubbed (``trainer_harness``): a row's completion depends only on its prompt and place in its
group, so every layout scores the same rows.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from trainer_harness import build_trainer, exit_distributed_run  # noqa: E402

from gnivo_trl.rewards import NoisyReward  # noqa: E402

NUM_GENERATIONS = 4
FLIP_PROBABILITY = 0.5
SEED = 3
STEPS = 4


def has_seven(completions, **kwargs) -> list[float]:
    return [float("7" in completion[0]["content"]) for completion in completions]


def main() -> None:
    model_dir, out, per_device = sys.argv[1], sys.argv[2], int(sys.argv[3])
    noisy = NoisyReward(has_seven, FLIP_PROBABILITY, mode="group", num_generations=NUM_GENERATIONS, seed=SEED)
    noisy.__name__ = "noisy_has_seven"
    trainer = build_trainer(
        "grpo",
        model_dir,
        str(Path(out).parent / "run"),
        reward=[noisy, has_seven],
        reward_weights=[1.0, 0.0],
        num_generations=NUM_GENERATIONS,
        per_device_train_batch_size=per_device,
        max_steps=STEPS,
        learning_rate=1e-3,
        seed=SEED,
    )
    gathered = []
    calculate = trainer._calculate_rewards

    def record(*args, **kwargs):
        rewards = calculate(*args, **kwargs)  # (global batch, reward functions), gathered over the processes
        gathered.append((trainer.state.global_step, rewards.detach().cpu().clone()))
        return rewards

    trainer._calculate_rewards = record
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save({"gathered": gathered, "stats": noisy.stats()}, out)
    if trainer.accelerator.num_processes > 1:
        exit_distributed_run(trainer.accelerator)


if __name__ == "__main__":
    main()
