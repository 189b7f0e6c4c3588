"""Construction-time checks shared by [`GNIVOConfig`][gnivo_trl.GNIVOConfig] and
[`VIMPOConfig`][gnivo_trl.VIMPOConfig]."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from trl import GRPOConfig

_GRPO_FIELDS = frozenset(f.name for f in dataclasses.fields(GRPOConfig))
GRPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.default is not dataclasses.MISSING}


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


def refusal(field: str, value, fix: str) -> str:
    """The package's configuration error message: the field, the offending value and how to fix it."""
    return f"{field}={value!r} is not supported: {fix}"


def fail(field: str, value, fix: str) -> None:
    """Raise the package's configuration error: the field, the offending value and how to fix it."""
    raise ValueError(refusal(field, value, fix))


class Refusals:
    """Every refused setting of one configuration, raised together as one `ValueError`, one line per field, so that
    a config with several refused settings is fixed in one attempt."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, field: str, value, fix: str) -> None:
        self.messages.append(refusal(field, value, fix))

    def __bool__(self) -> bool:
        return bool(self.messages)

    def raise_if_any(self) -> None:
        if self.messages:
            raise ValueError("\n".join(self.messages))

    def run_grpo_post_init(self, post_init: Callable[[], None]) -> None:
        """Run `GRPOConfig.__post_init__`. When settings are already refused, an error it raises (possibly caused
        by a refused value) is added to this error instead of hiding it."""
        try:
            post_init()
        except Exception as error:
            if not self:
                raise
            self.messages.append(f"(GRPOConfig also raised {type(error).__name__}: {error})")
            raise ValueError("\n".join(self.messages)) from error


def policy_moves_within_generation_batch(config: GRPOConfig) -> bool:
    """Whether the policy takes an optimizer step while a generation batch is still in use.

    A generation batch serves `steps_per_generation * num_iterations` micro-steps and an optimizer step happens
    every `gradient_accumulation_steps` micro-steps; unless the latter is a multiple of the former, some
    micro-batches are scored by an updated policy. This is the same condition under which TRL computes
    `old_per_token_logps`.
    """
    generate_every = config.steps_per_generation * config.num_iterations
    return config.gradient_accumulation_steps % generate_every != 0


def check_common_grpo_options(config: GRPOConfig, algorithm: str, refusals: Refusals) -> None:
    """Refuse GRPO options whose meaning does not carry over to a loss that replaces GRPO's: parts of GRPO's loss
    that either trainer would otherwise ignore silently. Only values other than `GRPOConfig`'s defaults are refused;
    the options that only act together with one of these (`sapo_*` and `vespo_*` with their `loss_type`,
    `entropy_coef_*` and `entropy_target` with `use_adaptive_entropy`) are inert, as in GRPO."""
    if config.top_entropy_quantile != 1.0:
        refusals.add(
            "top_entropy_quantile",
            config.top_entropy_quantile,
            f"{algorithm} sums log-ratios over whole completions, so dropping low-entropy tokens changes what is "
            "optimised. Leave top_entropy_quantile=1.0.",
        )
    if config.entropy_coef != 0.0:
        refusals.add("entropy_coef", config.entropy_coef, f"{algorithm} has no entropy bonus. Leave entropy_coef=0.0.")
    if config.use_adaptive_entropy:
        refusals.add(
            "use_adaptive_entropy",
            config.use_adaptive_entropy,
            f"{algorithm} has no entropy bonus to adapt. Leave use_adaptive_entropy=False.",
        )
    if config.off_policy_mask_threshold is not None:
        refusals.add(
            "off_policy_mask_threshold",
            config.off_policy_mask_threshold,
            f"the off-policy sequence mask is part of GRPO's loss, not {algorithm}'s. Leave it None.",
        )
    if config.multi_objective_aggregation != "sum_then_normalize":
        refusals.add(
            "multi_objective_aggregation",
            config.multi_objective_aggregation,
            f"{algorithm} uses the raw weighted sum of the reward functions (its own normalisation follows). "
            "Use 'sum_then_normalize' (the default).",
        )
    # GRPOConfig.__post_init__ turns True / False into "group" / "none"; both spellings are read here.
    scale_rewards = {True: "group", False: "none"}.get(config.scale_rewards, config.scale_rewards)
    if scale_rewards != GRPO_DEFAULTS["scale_rewards"]:
        refusals.add(
            "scale_rewards",
            config.scale_rewards,
            f"{algorithm} does not use GRPO's advantages, which scale_rewards normalises: its own loss reads the raw "
            f"rewards ({_REWARD_SCALE[algorithm]}). Leave scale_rewards='group' (the default), or rescale the rewards "
            "in the reward function.",
        )
    if config.loss_type != GRPO_DEFAULTS["loss_type"]:
        refusals.add(
            "loss_type",
            config.loss_type,
            f"{algorithm}'s loss replaces GRPO's, so GRPO's loss types would be ignored; its token means (TRL's KL "
            "term, the actor) use 'dapo''s normalisation over the generation batch. Leave loss_type='dapo'.",
        )
    if config.importance_sampling_level != GRPO_DEFAULTS["importance_sampling_level"]:
        refusals.add(
            "importance_sampling_level",
            config.importance_sampling_level,
            f"it selects the ratio of GRPO's clipped loss (GSPO's sequence-level ratio), which {algorithm} does not "
            "use and would ignore. Leave importance_sampling_level='token'.",
        )
    if config.delta is not None:
        refusals.add(
            "delta",
            config.delta,
            f"it bounds the ratio of GRPO's clipped loss (two-sided clipping), which {algorithm} does not use "
            f"and would ignore{_DELTA_INSTEAD[algorithm]}. Leave delta=None.",
        )


# How each algorithm reads the rewards, and what bounds its ratios instead of `delta`, for the messages above.
_REWARD_SCALE = {
    "GN-IVO": "softmax(R / gnivo_alpha) within each group; gnivo_alpha is in reward units",
    "VIMPO": "the value target R - mean_group(R)",
}
_DELTA_INSTEAD = {"GN-IVO": "", "VIMPO": " (its actor bounds negative advantages with vimpo_dual_clip)"}
