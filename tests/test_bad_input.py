"""Bad input, for both trainers: each case is a clear error or a documented behaviour, never a silent NaN or a hang.

The bad-input table of docs/scale.md#bad-input is this module: a reward function that raises or returns the wrong number of rewards,
rewards that are None / NaN / +-inf (the row has no reward and leaves its group), rewards that overflow
``exp(R / alpha)``, empty and all-truncated completions, groups with equal rewards, a dataset without a ``prompt``
column and incompatible options.
"""

import logging
import math

import pytest
import torch
from conftest import max_magnitude
from datasets import Dataset
from trainer_harness import build_trainer, parameter_update, record_scored_batches

from gnivo_trl import GNIVOConfig, VIMPOConfig
from gnivo_trl.group_bookkeeping import RewardFunctionError

ALGORITHMS = ["gnivo", "vimpo"]


def _texts(completions) -> list[str]:
    return [c[0]["content"] for c in completions]


def sevens_count(completions, **kwargs) -> list[float]:
    return [float(min(t.count("7"), 3)) for t in _texts(completions)]


def _with_bad_value(bad):
    """Reward: the number of 7s, except ``bad`` for completions containing "Hi" (1 row of 8 in step 1)."""

    def reward(completions, **kwargs):
        return [bad if "Hi" in t else float(min(t.count("7"), 3)) for t in _texts(completions)]

    return reward


def _stub_completions(trainer, completion_for_member) -> None:
    """Generation returns ``completion_for_member(member)`` token ids for the row with that index in its group."""

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [list(completion_for_member(row % num_generations)) for row in range(len(prompt_ids))], None

    trainer._generate_single_turn = generate


def _finite(update: dict) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in update.values())


def _logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------------------------------
# Reward functions that fail
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_reward_function_that_raises_is_named(algorithm, tiny_model_dir, tmp_path):
    def flaky_verifier(completions, **kwargs):
        raise ZeroDivisionError("division by zero in the verifier")

    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path), reward=[sevens_count, flaky_verifier])
    with pytest.raises(RewardFunctionError, match="'flaky_verifier' raised ZeroDivisionError") as caught:
        trainer.train()
    assert isinstance(caught.value.__cause__, ZeroDivisionError)  # the original error and traceback are chained


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_reward_function_with_wrong_length_is_named(algorithm, tiny_model_dir, tmp_path):
    def short(completions, **kwargs):
        return [1.0]

    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path), reward=short)
    with pytest.raises(ValueError, match="reward function 'short' returned 1 rewards, but 8 were expected"):
        trainer.train()


# ---------------------------------------------------------------------------------------------------------------------
# Rewards that are missing or not finite: the row has no reward and leaves its group
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def none_reward_run(tiny_model_dir, tmp_path_factory):
    cache = {}

    def get(algorithm: str):
        if algorithm not in cache:
            trainer = build_trainer(
                algorithm, tiny_model_dir, str(tmp_path_factory.mktemp("none")), reward=_with_bad_value(None)
            )
            batches = record_scored_batches(trainer)
            cache[algorithm] = (parameter_update(trainer), batches[0])
        return cache[algorithm]

    return get


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_none_reward_excludes_the_row(algorithm, none_reward_run):
    update, batch = none_reward_run(algorithm)
    excluded = torch.isnan(batch["row_rewards"])
    assert 0 < int(excluded.sum()) < excluded.numel()
    assert _finite(update) and max_magnitude(update) > 1e-4
    if algorithm == "gnivo":
        assert batch["gnivo_member"].tolist() == (~excluded).tolist()
        assert torch.all(batch["gnivo_weights"][excluded] == 0)
    else:
        assert torch.isnan(batch["vimpo_value_target"]).tolist() == excluded.tolist()
        assert torch.all(batch["vimpo_advantages"][excluded] == 0)
        # The other rows are centred on the mean of their group's remaining members.
        targets = batch["vimpo_value_target"].reshape(-1, 4)
        kept = ~excluded.reshape(-1, 4)
        for group in range(targets.size(0)):
            assert abs(float(targets[group][kept[group]].sum())) < 1e-5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nan_and_infinite_rewards_act_like_none(algorithm, bad, none_reward_run, tiny_model_dir, tmp_path, caplog):
    expected_update, expected_batch = none_reward_run(algorithm)
    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path), reward=_with_bad_value(bad))
    batches = record_scored_batches(trainer)
    with caplog.at_level(logging.WARNING, logger="gnivo_trl.group_bookkeeping"):
        update = parameter_update(trainer)
    assert torch.isnan(batches[0]["row_rewards"]).tolist() == torch.isnan(expected_batch["row_rewards"]).tolist()
    assert _finite(update)
    assert all(torch.equal(update[name], expected_update[name]) for name in update)  # exactly the None run
    if math.isinf(bad):
        assert "got an infinite reward (reward functions with infinite values: reward)" in caplog.text


def test_rewards_overflowing_unnormalized_weights_are_refused(tiny_model_dir, tmp_path):
    # R / alpha = 3 / 0.01 = 300 > 60: exp(300) overflows float32.
    trainer = build_trainer(
        "gnivo",
        tiny_model_dir,
        str(tmp_path),
        reward=sevens_count,
        gnivo_weight_normalization="none",
        gnivo_alpha=0.01,
    )
    with pytest.raises(ValueError, match=r"weight_normalization='none'.*R / alpha reaches 300.*'softmax'"):
        trainer.train()


def test_large_rewards_are_fine_with_softmax_weights(tiny_model_dir, tmp_path):
    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path), reward=sevens_count, gnivo_alpha=0.01)
    update = parameter_update(trainer)
    assert _finite(update) and max_magnitude(update) > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Degenerate completions and groups
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_completions_that_are_only_eos(algorithm, tiny_model_dir, tmp_path):
    """Rows that are only EOS (one completion token) train alongside ordinary rows: finite, and they count."""
    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path), max_steps=2)
    tokenizer = trainer.processing_class
    eos = tokenizer.eos_token_id
    seven = tokenizer("7 7 7", add_special_tokens=False)["input_ids"]
    words = tokenizer("nine ten", add_special_tokens=False)["input_ids"]
    completions = {0: [eos], 1: [eos], 2: seven + [eos], 3: words + [eos]}
    _stub_completions(trainer, completions.__getitem__)
    batches = record_scored_batches(trainer)
    update = parameter_update(trainer)
    assert _finite(update) and max_magnitude(update) > 1e-4
    assert all(math.isfinite(loss) for loss in _logged_losses(trainer))
    assert batches[0]["completion_mask"].sum(dim=1).tolist() == [1, 1, len(seven) + 1, len(words) + 1] * 2
    assert batches[0]["row_rewards"].tolist() == [0.0, 0.0, 1.0, 0.0] * 2  # empty text is scored ("" has no 7)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_completion_only_eos(algorithm, tiny_model_dir, tmp_path):
    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path), max_steps=2)
    _stub_completions(trainer, lambda member: [trainer.processing_class.eos_token_id])
    update = parameter_update(trainer)
    assert _finite(update) and max_magnitude(update) < 1e-6  # equal rewards (no 7 anywhere): no signal
    assert all(math.isfinite(loss) for loss in _logged_losses(trainer))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_token_completion_fails_inside_trl(algorithm, tiny_model_dir, tmp_path):
    """A completion with no token at all (possible only from a custom generator or rollout_func: transformers and
    vLLM always return at least one token) fails in TRL 1.16's own metrics code, before our loss runs."""
    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path))
    eos = trainer.processing_class.eos_token_id
    _stub_completions(trainer, lambda member: [] if member == 0 else [eos])
    with pytest.raises(IndexError, match="list index out of range") as caught:
        trainer.train()
    assert any(entry.name == "_generate" for entry in caught.traceback)  # ``ids[-1] not in eos_and_pad``


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_truncated_with_masking_gives_zero_gradient(algorithm, tiny_model_dir, tmp_path):
    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path), max_steps=2, mask_truncated_completions=True)
    tokenizer = trainer.processing_class
    texts = ["7 7 7 7 7 7 7", "nine ten nine ten", "Hi there. Hi there.", "3 + 4 = 7"]
    _stub_completions(trainer, lambda member: tokenizer(texts[member], add_special_tokens=False)["input_ids"])
    batches = record_scored_batches(trainer)
    update = parameter_update(trainer)
    assert int(batches[0]["completion_mask"].sum()) == 0  # no EOS anywhere: every row is truncated and masked
    assert batches[0]["completion_ids"].size(1) > 0
    assert _finite(update) and max_magnitude(update) == 0.0
    losses = _logged_losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def _constant_reward(completions, **kwargs) -> list[float]:
    return [2.5] * len(completions)


def test_groups_with_equal_rewards_give_zero_gradient_gnivo(tiny_model_dir, tmp_path):
    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path), reward=_constant_reward, max_steps=2)
    update = parameter_update(trainer)
    assert max_magnitude(update) == 0.0
    assert all(math.isfinite(loss) for loss in _logged_losses(trainer))


def test_groups_with_equal_rewards_give_no_value_signal_vimpo(tiny_model_dir, tmp_path):
    """VIMPO's value target R - mean_g R is 0; at step 1 the policy is the reference, so rho - kappa = 0 and the
    actor has no advantage either: the update is float noise (the loss-time and generation-time log-probs agree to
    ~1e-8), not a signal."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), reward=_constant_reward, max_steps=1)
    batches = record_scored_batches(trainer)
    update = parameter_update(trainer)
    assert torch.all(batches[0]["vimpo_value_target"] == 0)
    assert torch.all(batches[0]["vimpo_advantages"] == 0)
    assert max_magnitude(update) < 1e-6
    assert all(math.isfinite(loss) for loss in _logged_losses(trainer))


def test_equal_rewards_do_not_let_whitened_noise_move_vimpo(tiny_model_dir, tmp_path):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), reward=_constant_reward, max_steps=2)
    update = parameter_update(trainer)
    assert max_magnitude(update) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Datasets and options refused at construction
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dataset_without_prompt_column_is_refused(algorithm, tiny_model_dir, tmp_path):
    questions = Dataset.from_dict({"question": ["What is 1 + 1?"] * 8, "solution": ["2"] * 8})
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column \(its columns are \['question'"):
        build_trainer(algorithm, tiny_model_dir, str(tmp_path), train_dataset=questions)
    good = questions.rename_column("question", "prompt")
    with pytest.raises(ValueError, match=r"eval_dataset\['held_out'\] has no 'prompt' column"):
        build_trainer(
            algorithm,
            tiny_model_dir,
            str(tmp_path),
            train_dataset=good,
            trainer_kwargs=dict(eval_dataset={"held_out": questions}),
        )


@pytest.mark.parametrize(
    "config_cls, options, field",
    [
        (
            GNIVOConfig,
            dict(num_iterations=2, per_device_train_batch_size=2, gradient_accumulation_steps=2),
            "per_device_train_batch_size",
        ),
        (
            GNIVOConfig,
            dict(steps_per_generation=4, gradient_accumulation_steps=2, per_device_train_batch_size=2),
            "per_device_train_batch_size",
        ),
        (GNIVOConfig, dict(gnivo_alpha=0.0), "gnivo_alpha"),
        (GNIVOConfig, dict(num_generations=1), "num_generations"),
        (GNIVOConfig, dict(gnivo_weight_normalization="sum"), "gnivo_weight_normalization"),
        (
            GNIVOConfig,
            dict(use_vllm=True, vllm_importance_sampling_mode="token_mask"),
            "vllm_importance_sampling_mode",
        ),
        (GNIVOConfig, dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
        (VIMPOConfig, dict(beta=0.04), "beta"),
        (VIMPOConfig, dict(vimpo_kl_estimator="k1"), "vimpo_kl_estimator"),
        (VIMPOConfig, dict(vimpo_dual_clip=1.0), "vimpo_dual_clip"),
        (VIMPOConfig, dict(sync_ref_model=True), "sync_ref_model"),
        (VIMPOConfig, dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    ],
)
def test_incompatible_options_are_refused_naming_the_field(config_cls, options, field, tmp_path):
    with pytest.raises(ValueError, match=rf"^{field}=.* is not supported: "):
        config_cls(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)
