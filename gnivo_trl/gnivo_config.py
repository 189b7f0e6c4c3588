"""Configuration of `gnivo_trl.GNIVOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ._config_checks import (
    GRPO_DEFAULTS,
    Refusals,
    check_common_grpo_options,
    check_field_names,
    policy_moves_within_generation_batch,
)

PREFIX_UNITS = ("token", "step", "turn", "sequence")
WEIGHT_NORMALIZATIONS = ("softmax", "none")


@dataclass
class GNIVOConfig(GRPOConfig):
    r"""Configuration of [`GNIVOTrainer`][gnivo_trl.GNIVOTrainer]: Group-Normalized Implicit Value Optimization.

    Inherits every `trl.GRPOConfig` field. GN-IVO replaces GRPO's clipped-ratio loss, so GRPO's loss options
    (`loss_type`, `epsilon`, `epsilon_high`, `delta`, `importance_sampling_level`, `scale_rewards`, the entropy and
    off-policy masks) would have no effect: a value other than `GRPOConfig`'s default is refused at construction,
    with one `ValueError` naming every refused field, its value and the fix. Generation (vLLM included), reward
    functions and `reward_weights`, `beta` (TRL's per-token KL penalty to the frozen initial model, with
    `use_bias_correction_kl` and `sync_ref_model`), `num_iterations`, `mask_truncated_completions`, batching, logging
    and saving still apply. The only default that
    differs from `GRPOConfig` is `num_generations=4`, the paper's K. The
    [GN-IVO trainer page](https://gnivo-trl.github.io/gnivo-trl/gnivo_trainer/#configuration-reference) lists every
    field with its default.

    Args:
        gnivo_alpha (float): Reward temperature alpha of the target `pi_old * exp(R / alpha) / Z`; > 0. Defaults to
            0.2, the paper's.
        gnivo_prefix_unit (str): What closes a prefix. `"token"` (default): every completion token. `"step"`: a
            token whose decoded text completes an occurrence of `gnivo_step_delimiter` (the paper's reasoning steps).
            `"turn"`: the last model token of each assistant turn of a multi-turn rollout with `tools=` or
            `environment_factory=` (without tool output this is `"sequence"`). `"sequence"`: only the last token,
            the paper's one-step variant. Tool output never takes part in the loss.
        gnivo_step_delimiter (str): Text that separates reasoning steps when `gnivo_prefix_unit="step"`. Defaults
            to `"\n\n"`.
        gnivo_weight_normalization (str): `"softmax"` (default): target weights `softmax(R / alpha)` over the group,
            what the authors ran. `"none"`: the paper's Eq. 9 weights `exp(R / alpha) / K`, the only form whose
            minimiser is exact at every prefix; rewards with `R / alpha > 60` are refused.

    Examples:
        ```python
        from gnivo_trl import GNIVOConfig

        args = GNIVOConfig(
            output_dir="qwen-gnivo", gnivo_prefix_unit="step", learning_rate=1e-6
        )
        print(args.num_generations)  # 4, the paper's K
        ```
    """

    num_generations: int | None = field(
        default=4,
        metadata={"help": "Completions sampled per prompt (K). GN-IVO's paper default is 4."},
    )
    gnivo_alpha: float = field(
        default=0.2,
        metadata={"help": "Reward temperature alpha of the target pi_old * exp(R / alpha) / Z. Must be > 0."},
    )
    gnivo_prefix_unit: str = field(
        default="token",
        metadata={
            "help": "What closes a prefix: 'token' (every token), 'step' (a token that ends an occurrence of "
            "gnivo_step_delimiter), 'turn' (the last model token of each assistant turn of a multi-turn rollout with "
            "tools or an environment: the last token before each tool response, and the last token; the same as "
            "'sequence' without tool output) or 'sequence' (only the last token; the paper's one-step variant).",
            "choices": list(PREFIX_UNITS),
        },
    )
    gnivo_step_delimiter: str = field(
        default="\n\n",
        metadata={"help": "Text separating reasoning steps, used when gnivo_prefix_unit='step'."},
    )
    gnivo_weight_normalization: str = field(
        default="softmax",
        metadata={
            "help": "'softmax': target weights softmax(R / alpha) within each group (the authors' implementation). "
            "'none': exp(R / alpha) / K (the paper's Eq. 9; exact at every prefix, needs R / alpha <= 60 to stay finite in float32).",
            "choices": list(WEIGHT_NORMALIZATIONS),
        },
    )

    def __post_init__(self):
        refusals = Refusals()  # every refused setting, reported together
        if not isinstance(self.gnivo_alpha, int | float) or not self.gnivo_alpha > 0:
            refusals.add(
                "gnivo_alpha", self.gnivo_alpha, "the reward temperature must be a number > 0 (the paper uses 0.2)."
            )
        if self.gnivo_prefix_unit not in PREFIX_UNITS:
            refusals.add("gnivo_prefix_unit", self.gnivo_prefix_unit, f"choose one of {', '.join(PREFIX_UNITS)}.")
        if self.gnivo_prefix_unit == "step" and (
            not isinstance(self.gnivo_step_delimiter, str) or not self.gnivo_step_delimiter
        ):
            refusals.add(
                "gnivo_step_delimiter", self.gnivo_step_delimiter, "step units need a non-empty delimiter string."
            )
        if self.gnivo_weight_normalization not in WEIGHT_NORMALIZATIONS:
            refusals.add(
                "gnivo_weight_normalization",
                self.gnivo_weight_normalization,
                f"choose one of {', '.join(WEIGHT_NORMALIZATIONS)}.",
            )
        if self.num_generations is None or self.num_generations < 2:
            refusals.add(
                "num_generations", self.num_generations, "GN-IVO compares completions within a group; use K >= 2."
            )
        check_common_grpo_options(self, "GN-IVO", refusals)
        # GN-IVO has no clipped ratio: GRPO's clip range would be ignored.
        for name in ("epsilon", "epsilon_high"):
            if getattr(self, name) != GRPO_DEFAULTS[name]:
                refusals.add(
                    name,
                    getattr(self, name),
                    "it is the clip range of GRPO's ratio; GN-IVO's loss has no clipped ratio and would ignore it. "
                    f"Leave {name}={GRPO_DEFAULTS[name]!r}; the step size is set by learning_rate and gnivo_alpha.",
                )
        if (
            self.use_vllm
            and self.vllm_importance_sampling_correction
            and not self.vllm_importance_sampling_mode.startswith("sequence")
        ):
            refusals.add(
                "vllm_importance_sampling_mode",
                self.vllm_importance_sampling_mode,
                "GN-IVO weights whole completions, so it needs a sequence-level ratio. Use 'sequence_mask' "
                "(default) or 'sequence_truncate', or set vllm_importance_sampling_correction=False.",
            )
        refusals.run_grpo_post_init(super().__post_init__)
        if policy_moves_within_generation_batch(self) and self.per_device_train_batch_size % self.num_generations:
            refusals.add(
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
                f"the policy moves while a generation batch is in use (num_iterations={self.num_iterations}, "
                f"steps_per_generation={self.steps_per_generation}, "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}), so the group softmax needs every "
                f"group whole in one micro-batch. Make per_device_train_batch_size a multiple of "
                f"num_generations={self.num_generations}, or use num_iterations=1 with steps_per_generation equal "
                "to gradient_accumulation_steps.",
            )
        refusals.raise_if_any()


check_field_names(GNIVOConfig, "gnivo_")
