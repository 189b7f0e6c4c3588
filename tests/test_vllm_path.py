"""The vLLM code path on CPU with a stand-in generation backend: importance-sampling ratios reach both losses.

TRL computes the sequence-level ratio pi_old / pi_sampler from the sampler's log-probs; ``FakeVLLMGeneration``
returns the policy's own log-probs shifted so that the ratio of the row with index ``m`` in its group is
``exp(-shifts[m])``. Token-level modes are refused by both configs (tested in the trainer test modules).
"""

import math

import pytest
import torch
from conftest import max_difference, max_magnitude
from trainer_harness import build_trainer, parameter_update, use_fake_vllm

from gnivo_trl.losses import group_weights

SHIFTS = [0.0, 0.5, -0.5, -1.5]  # ratios 1, 0.61, 1.65, 4.48: the last is above clip_max = 3
EXPECTED_RATIOS = [math.exp(-s) for s in SHIFTS]


def _scored_batch(trainer):
    return trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(2)).repeat(4)))


@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo"])
@pytest.mark.parametrize("mode", ["sequence_mask", "sequence_truncate"])
def test_ratios_reach_the_batch(algorithm, mode, tiny_model_dir, tmp_path):
    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path))
    use_fake_vllm(trainer, mode, SHIFTS)
    batch = _scored_batch(trainer)
    ratio = batch["importance_sampling_ratio"].reshape(-1)
    expected = torch.tensor(EXPECTED_RATIOS * 2)
    expected = expected.masked_fill(expected > 3.0, 0.0) if mode == "sequence_mask" else expected.clamp(max=3.0)
    torch.testing.assert_close(ratio, expected, rtol=1e-4, atol=1e-5)
    if algorithm == "gnivo":
        weights = group_weights(batch["row_rewards"], 4, 0.2, "softmax", importance_ratio=ratio)
        torch.testing.assert_close(batch["gnivo_weights"], weights.weights)
        assert batch["gnivo_member"].tolist() == (ratio > 0).tolist()


@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo"])
def test_unit_ratios_give_the_same_update_as_plain_generation(algorithm, tiny_model_dir, tmp_path):
    # Ratios of exactly 1 (sampler = policy): the vLLM path must not change anything.
    plain = parameter_update(build_trainer(algorithm, tiny_model_dir, str(tmp_path / "plain"), max_steps=2))
    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path / "vllm"), max_steps=2)
    use_fake_vllm(trainer, "sequence_mask", [0.0] * 4)
    update = parameter_update(trainer)
    assert max_difference(update, plain) <= 1e-4 * max_magnitude(plain)


@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo"])
@pytest.mark.parametrize("mode", ["sequence_mask", "sequence_truncate"])
def test_ratios_change_the_update_and_keep_it_finite(algorithm, mode, tiny_model_dir, tmp_path):
    plain = parameter_update(build_trainer(algorithm, tiny_model_dir, str(tmp_path / "plain"), max_steps=2))
    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path / "vllm"), max_steps=2)
    use_fake_vllm(trainer, mode, SHIFTS)
    update = parameter_update(trainer)
    assert all(torch.isfinite(value).all() for value in update.values())
    assert max_difference(update, plain) > 1e-3 * max_magnitude(plain)
    assert any("sampling/importance_sampling_ratio/mean" in entry for entry in trainer.state.log_history)
