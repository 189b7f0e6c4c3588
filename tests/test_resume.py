"""Resuming from a checkpoint: a run interrupted at step 2 and resumed in a fresh trainer ends with the same
parameters as an uninterrupted run with the same seed (generation is stubbed and deterministic; HF Trainer
checkpoints restore the model, the AdamW state, the scheduler and the RNG states)."""

import shutil
from pathlib import Path

import pytest
import torch
from trainer_harness import build_trainer
from transformers import TrainerCallback

RUN = dict(
    max_steps=4,
    save_strategy="steps",
    save_steps=2,
    optim="adamw_torch",
    learning_rate=1e-2,
    max_grad_norm=1.0,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
)
LAYOUTS = {
    "default": {},
    # A generation batch serves two optimizer steps (the policy moves inside it): whole groups are shuffled.
    "num_iterations=2": dict(num_iterations=2),
}


class StopAt(TrainerCallback):
    """Stop training after optimizer step ``step`` (after that step's checkpoint is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _parameters(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def _train(
    algorithm: str, model_dir: str, output_dir: Path, stop_at: int | None = None, resume: str | None = None, **extra
):
    trainer = build_trainer(algorithm, model_dir, str(output_dir), **{**RUN, **extra})
    if stop_at is not None:
        trainer.add_callback(StopAt(stop_at))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _max_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo"])
def test_resumed_run_matches_uninterrupted_run(algorithm, layout, tiny_model_dir, tmp_path):
    extra = LAYOUTS[layout]
    # Saving consumes no randomness, so the reference run need not write checkpoints.
    full = _train(algorithm, tiny_model_dir, tmp_path / "full", **dict(extra, save_strategy="no"))
    assert full.state.global_step == 4
    expected = _parameters(full)

    interrupted = _train(algorithm, tiny_model_dir, tmp_path / "resumed", stop_at=2, **extra)
    assert interrupted.state.global_step == 2
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "rng_state.pth").exists()
    assert _max_difference(_parameters(interrupted), expected) > 1e-4  # steps 3 and 4 still have work to do
    if layout == "default":  # negative control, below
        shutil.copytree(checkpoint, tmp_path / "no-optimizer" / "checkpoint-2")

    resumed = _train(algorithm, tiny_model_dir, tmp_path / "resumed", resume=str(checkpoint), **extra)
    assert resumed.state.global_step == 4
    # Bit-identical: same rows, same order, same optimizer state, same arithmetic.
    assert _max_difference(_parameters(resumed), expected) == 0.0
    full_losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    resumed_losses = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert len(full_losses) == 4
    assert resumed_losses == full_losses  # log_history is restored from the checkpoint and continued

    if layout == "default":
        # Negative control: without the AdamW moments the resumed run does not reproduce the uninterrupted one.
        stripped = tmp_path / "no-optimizer" / "checkpoint-2"
        (stripped / "optimizer.pt").unlink()
        without_state = _train(algorithm, tiny_model_dir, tmp_path / "no-optimizer", resume=str(stripped), **extra)
        assert _max_difference(_parameters(without_state), expected) > 1e-4
