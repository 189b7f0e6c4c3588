"""Configuration of :class:`gnivo_trl.VIMPOTrainer`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import GRPOConfig

from ._config_checks import check_common_grpo_options, check_field_names, fail

KL_ESTIMATORS = ("exact", "k2", "k3")


@dataclass
class VIMPOConfig(GRPOConfig):
    r"""
    Configuration of [`VIMPOTrainer`]: Value-Implicit Policy Optimization (Kang et al., arXiv 2606.20008), with the
    semantics of the authors' official implementation.

    Inherits every [`trl.GRPOConfig`] field. Defaults that differ from `GRPOConfig`: `num_generations=8`,
    `epsilon_high=0.28` (the official run's clip range 0.2 / 0.28) and `use_bias_correction_kl=False` (there is no
    GRPO KL term to correct). `epsilon` and `epsilon_high` clip the actor's PPO ratio; `beta` must stay 0.0 (VIMPO's
    KL coefficient lives inside the value, `vimpo_beta`); `scale_rewards` has no effect (the value target is
    `R - mean_group(R)`). GRPO loss options that VIMPO would otherwise ignore silently (`loss_type` other than its
    token mean `"dapo"`, `importance_sampling_level="sequence"`, `delta`, `use_bias_correction_kl`) and FSDP are
    refused at construction.

    Parameters:
        vimpo_beta (`float`, *optional*, defaults to `5e-4`):
            KL coefficient beta of the policy-implied value `beta * (log pi_theta / pi_ref - KL)`.
        vimpo_actor_coef (`float`, *optional*, defaults to `5e-3`):
            Weight c_A of the actor loss in `L = L_V + c_A * L_A`; 0 gives the "value-only" variant.
        vimpo_gae_lambda (`float`, *optional*, defaults to `1.0`):
            lambda of the reverse accumulation of `rho - kappa` into the actor advantage, in [0, 1].
        vimpo_kl_estimator (`str`, *optional*, defaults to `"exact"`):
            Per-token KL(pi_theta || pi_ref): `"exact"` (full vocabulary at the sampling temperature, computed in
            chunks), or the sampled estimators `"k2"` / `"k3"`. `"k1"` is refused (it makes `rho - kappa` zero).
        vimpo_kl_chunk_size (`int`, *optional*, defaults to `1024`):
            Completion tokens whose full-vocabulary log-probabilities are held at once by the exact KL.
        vimpo_dual_clip (`float`, *optional*, defaults to `10.0`):
            Dual-clip constant c (> 1) bounding the actor loss of tokens with negative advantage.
    """

    num_generations: int | None = field(
        default=8,
        metadata={"help": "Completions sampled per prompt (K). The official VIMPO run uses 8."},
    )
    epsilon_high: float | None = field(
        default=0.28,
        metadata={"help": "Upper clip bound of the actor's PPO ratio (1 + epsilon_high). The official run uses 0.28."},
    )
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={"help": "GRPO's importance correction of its KL term. VIMPO has no such term: must stay False."},
    )
    vimpo_beta: float = field(
        default=5e-4,
        metadata={"help": "KL coefficient beta of the policy-implied value beta * (log pi/pi_ref - KL). Must be > 0."},
    )
    vimpo_actor_coef: float = field(
        default=5e-3,
        metadata={"help": "Weight c_A of the actor loss in L = L_V + c_A * L_A; 0 gives the value-only variant."},
    )
    vimpo_gae_lambda: float = field(
        default=1.0,
        metadata={"help": "lambda of the reverse accumulation of rho - kappa into the actor advantage, in [0, 1]."},
    )
    vimpo_kl_estimator: str = field(
        default="exact",
        metadata={
            "help": "Per-token KL(pi_theta || pi_ref): 'exact' (full vocabulary, chunked), or the sampled estimators "
            "'k2' / 'k3'. 'k1' is refused: it makes rho - kappa identically zero.",
            "choices": list(KL_ESTIMATORS),
        },
    )
    vimpo_kl_chunk_size: int = field(
        default=1024,
        metadata={"help": "Completion tokens whose full-vocabulary distributions the exact KL holds at once."},
    )
    vimpo_dual_clip: float = field(
        default=10.0,
        metadata={"help": "Dual-clip constant c (> 1) bounding the actor loss of negative-advantage tokens."},
    )

    def __post_init__(self):
        if self.beta != 0.0:
            fail(
                "beta",
                self.beta,
                "VIMPO has no separate KL penalty: its KL coefficient lives inside the policy-implied value "
                "(vimpo_beta), and adding GRPO's would count the KL twice. Leave beta=0.0 and set vimpo_beta.",
            )
        if not self.vimpo_beta > 0:
            fail("vimpo_beta", self.vimpo_beta, "the value's KL coefficient must be > 0 (the paper uses 5e-4).")
        if not self.vimpo_actor_coef >= 0:
            fail("vimpo_actor_coef", self.vimpo_actor_coef, "use a weight >= 0 (0 is the value-only variant).")
        if not 0.0 <= self.vimpo_gae_lambda <= 1.0:
            fail("vimpo_gae_lambda", self.vimpo_gae_lambda, "lambda must lie in [0, 1] (the paper uses 1.0).")
        if self.vimpo_kl_estimator == "k1":
            fail(
                "vimpo_kl_estimator",
                "k1",
                "the k1 estimate log pi/pi_ref makes rho - kappa identically zero, so VIMPO would learn nothing. "
                "Use 'exact' (default), 'k2' or 'k3'.",
            )
        if self.vimpo_kl_estimator not in KL_ESTIMATORS:
            fail("vimpo_kl_estimator", self.vimpo_kl_estimator, f"choose one of {', '.join(KL_ESTIMATORS)}.")
        if not isinstance(self.vimpo_kl_chunk_size, int) or self.vimpo_kl_chunk_size < 1:
            fail("vimpo_kl_chunk_size", self.vimpo_kl_chunk_size, "use a positive number of tokens, e.g. 1024.")
        if not self.vimpo_dual_clip > 1.0:
            fail("vimpo_dual_clip", self.vimpo_dual_clip, "the dual-clip constant must be > 1 (the paper uses 10).")
        if self.num_generations is None or self.num_generations < 2:
            fail("num_generations", self.num_generations, "VIMPO centres rewards within a group; use K >= 2.")
        if self.sync_ref_model:
            fail("sync_ref_model", True, "VIMPO's reference is the frozen initial model. Leave sync_ref_model=False.")
        if self.loss_type != "dapo":
            fail(
                "loss_type",
                self.loss_type,
                "VIMPO's loss is its own (value loss plus a PPO actor averaged over the generation batch's tokens, "
                "GRPO's 'dapo' normalisation); other GRPO loss types would be ignored. Leave loss_type='dapo'.",
            )
        if self.importance_sampling_level != "token":
            fail(
                "importance_sampling_level",
                self.importance_sampling_level,
                "VIMPO's actor clips per-token ratios (the official implementation); GSPO's sequence-level ratio "
                "would be ignored. Leave importance_sampling_level='token'.",
            )
        if self.delta is not None:
            fail(
                "delta",
                self.delta,
                "VIMPO's actor uses a dual clip for negative advantages (vimpo_dual_clip), not GRPO's two-sided "
                "clipping, which would be ignored. Leave delta=None.",
            )
        if self.use_bias_correction_kl:
            fail(
                "use_bias_correction_kl",
                self.use_bias_correction_kl,
                "it corrects GRPO's KL penalty, which VIMPO does not have (beta=0). Leave it False (VIMPOConfig's "
                "default).",
            )
        super().__post_init__()
        if self.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
            fail("fsdp", self.fsdp or "accelerate FSDP config", _FSDP_FIX)
        check_common_grpo_options(self, "VIMPO")
        if (
            self.use_vllm
            and self.vllm_importance_sampling_correction
            and not self.vllm_importance_sampling_mode.startswith("sequence")
        ):
            fail(
                "vllm_importance_sampling_mode",
                self.vllm_importance_sampling_mode,
                "VIMPO's value loss is a per-completion regression, so it needs a sequence-level ratio. Use "
                "'sequence_mask' (default) or 'sequence_truncate', or set vllm_importance_sampling_correction=False.",
            )


_FSDP_FIX = (
    "VIMPO's scoring reads both LM heads directly and has not been tested under FSDP's sharded (DTensor) "
    "parameters (accelerate cannot run FSDP on CPU, where the test suite runs). Use DeepSpeed ZeRO-3 instead: "
    "accelerate launch --config_file examples/accelerate_configs/zero3.yaml, which is tested."
)


check_field_names(VIMPOConfig, "vimpo_")
