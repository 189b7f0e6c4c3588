"""Construction-time checks shared by [`GNIVOConfig`][gnivo_trl.GNIVOConfig] and
[`VIMPOConfig`][gnivo_trl.VIMPOConfig]."""

from __future__ import annotations

import dataclasses

from trl import GRPOConfig

_GRPO_FIELDS = frozenset(f.name for f in dataclasses.fields(GRPOConfig))


def check_field_names(config_cls: type, prefix: str) -> None:
    """Every field a subclass adds must start with `prefix` and must not shadow a `GRPOConfig` field.

    A shadowed field silently changes TRL's behaviour (a peer package's `delta` turned off TRL's clipping), so
    this runs once per class, when it is defined.
    """
    for field in dataclasses.fields(config_cls):
        if field.name in _GRPO_FIELDS:
            continue
        if not field.name.startswith(prefix):
            raise TypeError(f"{config_cls.__name__}.{field.name}: new config fields must start with {prefix!r}.")


def fail(field: str, value, fix: str) -> None:
    """Raise the package's configuration error: the field, the offending value and how to fix it."""
    raise ValueError(f"{field}={value!r} is not supported: {fix}")


def policy_moves_within_generation_batch(config: GRPOConfig) -> bool:
    """Whether the policy takes an optimizer step while a generation batch is still in use.

    A generation batch serves `steps_per_generation * num_iterations` micro-steps and an optimizer step happens
    every `gradient_accumulation_steps` micro-steps; unless the latter is a multiple of the former, some
    micro-batches are scored by an updated policy. This is the same condition under which TRL computes
    `old_per_token_logps`.
    """
    generate_every = config.steps_per_generation * config.num_iterations
    return config.gradient_accumulation_steps % generate_every != 0


def check_common_grpo_options(config: GRPOConfig, algorithm: str) -> None:
    """Refuse GRPO options whose meaning does not carry over to a loss that replaces GRPO's."""
    if config.top_entropy_quantile != 1.0:
        fail(
            "top_entropy_quantile",
            config.top_entropy_quantile,
            f"{algorithm} sums log-ratios over whole completions, so dropping low-entropy tokens changes what is "
            "optimised. Leave top_entropy_quantile=1.0.",
        )
    if config.entropy_coef != 0.0 or config.use_adaptive_entropy:
        fail(
            "entropy_coef" if config.entropy_coef != 0.0 else "use_adaptive_entropy",
            config.entropy_coef if config.entropy_coef != 0.0 else config.use_adaptive_entropy,
            f"{algorithm} has no entropy bonus. Leave entropy_coef=0.0 and use_adaptive_entropy=False.",
        )
    if config.off_policy_mask_threshold is not None:
        fail(
            "off_policy_mask_threshold",
            config.off_policy_mask_threshold,
            f"the off-policy sequence mask is part of GRPO's loss, not {algorithm}'s. Leave it None.",
        )
    if config.multi_objective_aggregation != "sum_then_normalize":
        fail(
            "multi_objective_aggregation",
            config.multi_objective_aggregation,
            f"{algorithm} uses the raw weighted sum of the reward functions (its own normalisation follows). "
            "Use 'sum_then_normalize' (the default).",
        )
