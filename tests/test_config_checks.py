"""What each trainer does with every `GRPOConfig` field: used, refused (a value other than GRPO's default would be
ignored by the loss), or inert (acts only together with a refused setting, as in GRPO). Refusals of one config are
reported together, in one error."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import assert_refused_with_field_and_fix
from transformers import TrainingArguments
from trl import GRPOConfig

from gnivo_trl import GNIVOConfig, VIMPOConfig

CONFIG = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")

# A non-default value of each GRPO field a trainer refuses, because its loss would ignore it.
REFUSED_BY_BOTH = dict(
    loss_type="grpo",
    importance_sampling_level="sequence",
    delta=2.0,
    scale_rewards="batch",
    top_entropy_quantile=0.5,
    entropy_coef=0.01,
    use_adaptive_entropy=True,
    off_policy_mask_threshold=0.5,
    multi_objective_aggregation="normalize_then_sum",
)
REFUSED = {
    GNIVOConfig: dict(REFUSED_BY_BOTH, epsilon=0.3, epsilon_high=0.28),  # GN-IVO has no clipped ratio
    VIMPOConfig: dict(REFUSED_BY_BOTH, beta=0.1, sync_ref_model=True, use_bias_correction_kl=True),
}
# Act only with a refused loss_type ("sapo", "vespo") or use_adaptive_entropy, as in GRPO with its default loss.
INERT = dict(
    sapo_temperature_neg=2.0,
    sapo_temperature_pos=2.0,
    vespo_k_pos=1.0,
    vespo_lambda_pos=1.0,
    vespo_k_neg=1.0,
    vespo_lambda_neg=1.0,
    entropy_coef_min=0.1,
    entropy_coef_max=0.5,
    entropy_coef_delta=0.01,
    entropy_target=0.3,
)
# Used by both trainers as GRPOTrainer uses them (generation, rewards, batching, the reference, logging), or, for
# epsilon / epsilon_high (VIMPO's actor clip), beta / use_bias_correction_kl / sync_ref_model /
# ref_model_* (GN-IVO's KL penalty to the reference), by the trainer that does not refuse them.
USED = {
    "model_init_kwargs",
    "trust_remote_code",
    "router_aux_loss_coef",
    "disable_dropout",
    "cast_lm_head_to_fp32",
    "num_generations",
    "num_generations_eval",
    "max_completion_length",
    "ds3_gather_for_generation",
    "shuffle_dataset",
    "pad_to_multiple_of",
    "generation_batch_size",
    "steps_per_generation",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "generation_kwargs",
    "chat_template_kwargs",
    "repetition_penalty",
    "cache_implementation",
    "beta",
    "num_iterations",
    "epsilon",
    "epsilon_high",
    "reward_weights",
    "mask_truncated_completions",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "max_tool_calling_iterations",
    "use_bias_correction_kl",
    "log_completions",
    "log_multimodal",
    "num_completions_to_print",
    "log_unique_prompts",
    "log_completions_hub_repo",
    "use_transformers_continuous_batching",
    "transformers_continuous_batching_config",
    "use_transformers_paged",
    "use_vllm",
}
# vLLM's settings (generation; its importance-sampling correction in the sequence-level modes) are used as in GRPO.
VLLM_PREFIX = "vllm_"


def test_every_grpo_field_is_used_refused_or_inert():
    """A TRL release that adds a GRPOConfig field fails here until the field is classified (and refused by a
    trainer whose loss would ignore it)."""
    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    classified = USED | set(INERT) | set(REFUSED[GNIVOConfig]) | set(REFUSED[VIMPOConfig])
    unclassified = {name for name in grpo_fields - classified if not name.startswith(VLLM_PREFIX)}
    assert unclassified == set()
    assert classified <= grpo_fields


@pytest.mark.parametrize("config_cls", [GNIVOConfig, VIMPOConfig])
def test_a_grpo_option_the_loss_would_ignore_is_refused_with_field_and_fix(config_cls):
    for field, value in REFUSED[config_cls].items():
        assert_refused_with_field_and_fix(config_cls, field, **CONFIG, **{field: value})


@pytest.mark.parametrize("config_cls", [GNIVOConfig, VIMPOConfig])
def test_the_other_spellings_of_reward_scaling_are_refused_and_the_default_accepted(config_cls):
    for value in ("none", False):
        assert_refused_with_field_and_fix(config_cls, "scale_rewards", **CONFIG, scale_rewards=value)
    for value in ("group", True):
        assert config_cls(**CONFIG, scale_rewards=value).scale_rewards == "group"


@pytest.mark.parametrize("config_cls", [GNIVOConfig, VIMPOConfig])
def test_grpo_defaults_set_explicitly_and_inert_options_are_accepted(config_cls):
    defaults = {name: getattr(GRPOConfig, name) for name in REFUSED_BY_BOTH}
    config_cls(**CONFIG, **defaults)
    config_cls(**CONFIG, **INERT)
    if config_cls is GNIVOConfig:
        GNIVOConfig(**CONFIG, epsilon=0.2, epsilon_high=None, beta=0.04, use_bias_correction_kl=False)
    else:
        VIMPOConfig(**CONFIG, epsilon=0.1, epsilon_high=0.3)  # the actor's clip range


def test_every_refused_field_of_a_config_is_reported_in_one_error():
    """VIMPO used to refuse beta, then, once that was fixed, sync_ref_model, one per attempt."""
    with pytest.raises(ValueError) as error:
        VIMPOConfig(**CONFIG, beta=0.04, sync_ref_model=True, loss_type="grpo", vimpo_beta=0.0, scale_rewards="none")
    lines = str(error.value).splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "beta",
        "vimpo_beta",
        "sync_ref_model",
        "scale_rewards",
        "loss_type",
    ]
    assert all(" is not supported: " in line for line in lines)


def test_refusals_found_after_grpos_own_checks_are_reported_with_the_others():
    """GN-IVO's batch-layout check needs GRPOConfig's derived steps_per_generation; it is still in the same error."""
    with pytest.raises(ValueError) as error:
        GNIVOConfig(
            **CONFIG,
            delta=2.0,
            epsilon=0.1,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            num_iterations=2,
        )
    fields = [line.split("=")[0] for line in str(error.value).splitlines()]
    assert fields == ["delta", "epsilon", "per_device_train_batch_size"]


def test_an_error_of_grpoconfig_caused_by_a_refused_value_is_added_to_the_refusals():
    with pytest.raises(ValueError) as error:
        GNIVOConfig(**CONFIG, num_generations=None, loss_type="grpo")
    lines = str(error.value).splitlines()
    assert lines[0].startswith("num_generations=None") and lines[1].startswith("loss_type='grpo'")
    assert "GRPOConfig also raised" in lines[2]


def test_grpoconfigs_own_errors_are_unchanged_without_refusals():
    with pytest.raises(ValueError, match="auto_find_batch_size is not supported by GRPO"):
        GNIVOConfig(**CONFIG, auto_find_batch_size=True)


def test_reference_refresh_settings_that_vimpo_update_ref_freq_would_overwrite_are_refused():
    assert_refused_with_field_and_fix(
        VIMPOConfig, "ref_model_sync_steps", **CONFIG, vimpo_update_ref_freq=2, ref_model_sync_steps=100
    )
    assert_refused_with_field_and_fix(
        VIMPOConfig, "ref_model_mixup_alpha", **CONFIG, vimpo_update_ref_freq=2, ref_model_mixup_alpha=0.5
    )
    config = VIMPOConfig(**CONFIG, vimpo_update_ref_freq=2)
    assert (config.ref_model_mixup_alpha, config.ref_model_sync_steps) == (1.0, 2)
    VIMPOConfig(**CONFIG, vimpo_update_ref_freq=2, ref_model_mixup_alpha=1.0, ref_model_sync_steps=2)  # the same
    VIMPOConfig(**CONFIG, ref_model_sync_steps=100)  # inert without a refresh, as in GRPO without sync_ref_model
