"""Configuration of `gnivo_trl.VIMPOTrainer`."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

from trl import GRPOConfig

from ._config_checks import GRPO_DEFAULTS, Refusals, check_common_grpo_options, check_field_names

KL_ESTIMATORS = ("exact", "candidate_set", "k2", "k3")
VALUE_LOSS_TYPES = ("squared_error", "huber")


class _DefaultActorCoeff(float):
    """`vimpo_actor_coeff`'s default value (5e-3), of its own type so that a value the user sets, even 5e-3 itself,
    can be told from the default when the deprecated alias `vimpo_actor_coef` is set too."""


_DEFAULT_ACTOR_COEFF = _DefaultActorCoeff(5e-3)


@dataclass
class VIMPOConfig(GRPOConfig):
    r"""Configuration of [`VIMPOTrainer`][gnivo_trl.VIMPOTrainer]: Value-Implicit Policy Optimization.

    The semantics are those of the authors' official implementation. Inherits every `trl.GRPOConfig` field. Defaults
    that differ from `GRPOConfig`: `epsilon_high=0.28` (the official run's clip range 0.2 / 0.28) and
    `use_bias_correction_kl=False` (there is no GRPO KL term to correct); `num_generations` is 8, as in GRPOConfig and
    the official run. `epsilon` and `epsilon_high` clip
    the actor's PPO ratio. `beta` must stay 0.0: VIMPO's KL coefficient lives inside the value (`vimpo_beta`).
    GRPO options that VIMPO would otherwise ignore silently (`scale_rewards`, the value target being `R -
    mean_group(R)`; `loss_type` other than its token mean `"dapo"`; `importance_sampling_level="sequence"`; `delta`;
    `use_bias_correction_kl`; the entropy and off-policy masks) and FSDP are refused at construction, all in one
    `ValueError` naming each refused field, its value and the fix. The
    [VIMPO trainer page](https://gnivo-trl.github.io/gnivo-trl/vimpo_trainer/#configuration-reference) lists every
    field with its default and compares them with the official options.

    Args:
        vimpo_beta (float): KL coefficient beta of the policy-implied value `beta * (log pi_theta / pi_ref - KL)`.
            Defaults to `5e-4`.
        vimpo_actor_coeff (float): Weight c_A of the actor loss in `L = L_V + c_A * L_A`; 0 gives the "value-only"
            variant (the official `vimpo_actor_coeff`). Ignored with `vimpo_adaptive_actor_coeff=True`, which computes
            c_A per micro-batch. Defaults to `5e-3`.
        vimpo_actor_coef (float | None): Deprecated alias of `vimpo_actor_coeff`, removed in the next release: when
            set, it warns (FutureWarning) and is copied into `vimpo_actor_coeff`; setting both to different values is
            refused. Defaults to `None`.
        vimpo_gae_lambda (float): lambda of the reverse accumulation of `rho - kappa` into the actor advantage, in [0,
            1]. Defaults to `1.0`.
        vimpo_kl_estimator (str): Per-token KL(pi_theta || pi_ref): `"exact"` (full vocabulary at the sampling
            temperature, computed in chunks), `"candidate_set"` (the official approximation: the sum of `p (log p - log
            q)` over the `vimpo_candidate_kl_topk` tokens of largest policy probability, both distributions normalised
            over the full vocabulary; it can be slightly negative and equals the exact KL once the set covers the
            vocabulary), or the sampled estimators `"k2"` / `"k3"`. `"k1"` is refused (it makes `rho - kappa` zero).
            Defaults to `"exact"`.
        vimpo_candidate_kl_topk (int): Size of the candidate set of `vimpo_kl_estimator="candidate_set"` (the official
            `candidate_kl_topk`). 32 is the value of the authors' run script (`run_vimpo.sh`), which passes it
            explicitly, so the yaml's 128 never took effect on their path; a larger set is closer to the exact KL at
            about the same cost. Defaults to `32`.
        vimpo_kl_chunk_size (int): Completion tokens per tile of the one pass of both LM heads that scores every
            estimator: each head's float32 `(chunk, 32768)` tile is held at once (256 MiB for both at 1024 tokens
            where Triton runs; on CPU TRL's torch fold adds temporaries of the same size, about 4x that in all).
            Defaults to `1024`.
        vimpo_value_loss_type (str): Per-completion value loss of the terminal residual `r`: `"squared_error"` (`0.5
            r^2`) or `"huber"` (`0.5 r^2` for `|r| <= delta`, else `delta (|r| - delta / 2)`; PyTorch's `huber_loss`,
            gradient `clamp(r, -delta, delta)`), as the official `vimpo_value_loss_type`. Defaults to
            `"squared_error"`.
        vimpo_value_huber_delta (float): Huber threshold `delta` (> 0, checked whatever the loss type, as the official
            code does). 0.005 is the value of the authors' run script, the only one they ran with (yaml 0.5, code
            fallback 1.0). The residual is in reward units and starts at `-(R - mean_g R)`, so for 0/1 rewards 0.005
            makes the value loss essentially an L1 loss (per-row gradient `0.005 * sign(r)`), while 0.5 or 1.0 would be
            nearly the squared error. Defaults to `0.005`.
        vimpo_value_type (str): `"raw"`: the policy-implied value `sum_t (rho - kappa)` regressed onto `R - V0`. The
            official `"soft"` value (prediction `beta * sum_t log pi_theta / pi_ref` onto `R - V0_soft`, with `V0_soft`
            the group mean of `R - beta * sum_t KL(pi_old || pi_ref)` measured at generation time) is refused: it needs
            a generation-time pass of both models over the whole generation batch (the KL sums of every row of a group
            before any loss step), which this trainer's single loss-time scoring path does not run, and the official
            code allows it only for the value-only variant. The pure functions `gnivo_trl.losses.soft_value_baselines`
            / `soft_vimpo_value_loss` implement its math. Defaults to `"raw"`.
        vimpo_cap_v0 (float | None): Upper bound on the per-prompt baseline: the value target is `R - min(mean_g R,
            vimpo_cap_v0)` (the official `vimpo_cap_v0`); None does not cap. Defaults to `None`.
        vimpo_update_ref_freq (int): Replace the reference by a hard copy of the policy after every
            `vimpo_update_ref_freq` generation batches (the official training steps: the first copy follows the update
            of batch N); 0 never does. Runs TRL's `SyncRefModelCallback` schedule, copying one parameter at a time (under
            ZeRO-3 no rank gathers the whole model), with `ref_model_mixup_alpha=1.0` and
            `ref_model_sync_steps` set to N times the optimizer steps per generation batch (`steps_per_generation *
            num_iterations / gradient_accumulation_steps`, which must come out whole); those two fields are derived
            from this one. TRL's own `sync_ref_model=True` (a TR-DPO mixture of policy and reference) stays refused: it
            is not VIMPO's semantics. Refused with PEFT (the reference is the policy with its adapter disabled; a
            refresh would have to merge the adapter) as by the official code. The reference is not checkpointed: after
            a resume it is the initial model until the next refresh (as in the official code). Defaults to `0`.
        vimpo_dual_clip (float): Dual-clip constant c (> 1) bounding the actor loss of tokens with negative advantage.
            Defaults to `10.0`.
        vimpo_adaptive_actor_coeff (bool): Replace the fixed `vimpo_actor_coeff` (then ignored) by the official
            adaptive coefficient: per micro-batch, the RMS over valid tokens (all processes) of the logit-gradient norm
            of the value loss and of the actor loss taken with weight 1 (the analytic `|dL/dlog p_y| * ||e_y - p||_2`),
            each exponentially averaged without bias correction, give `c_A = alpha * EMA_value / (EMA_actor + eps)`,
            used for that same micro-batch; a micro-batch without actor gradient gets `c_A = 0` and leaves the averages
            unchanged. The averages are not checkpointed (after a resume both restart from 0, which changes only the
            smoothing). Unlike the official code, which silently keeps the fixed coefficient with the sampled `k2`/`k3`
            KL, it works with every `vimpo_kl_estimator` (`sum_v p_v^2` comes from the same pass of the policy's head as
            its log-probabilities).
            Defaults to `False`.
        vimpo_adaptive_actor_alpha (float): Target ratio alpha (>= 0) of the actor's to the value's logit-gradient RMS.
            0.025 is the value of the authors' run script (`run_vimpo.sh`); their yaml says 0.15. Defaults to `0.025`.
        vimpo_adaptive_actor_ema_decay (float): Decay d in [0, 1) of both averages: `EMA <- d * EMA + (1 - d) * RMS`,
            once per micro-batch. Defaults to `0.9`.
        vimpo_adaptive_actor_eps (float): Added (> 0) to the actor average in the coefficient's denominator. Defaults
            to `1e-12`.

    Examples:
        ```python
        from gnivo_trl import VIMPOConfig

        # the authors' run: beta 5e-4, actor weight 5e-3, K=8
        paper = VIMPOConfig(output_dir="qwen-vimpo")
        short = VIMPOConfig(output_dir="vimpo-short", vimpo_adaptive_actor_coeff=True)
        ```
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
    vimpo_actor_coeff: float = field(
        default=_DEFAULT_ACTOR_COEFF,
        metadata={
            "help": "Weight c_A of the actor loss in L = L_V + c_A * L_A; 0 gives the value-only variant. Ignored "
            "with vimpo_adaptive_actor_coeff=True."
        },
    )
    vimpo_actor_coef: float | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of vimpo_actor_coeff (removed in the next release): when set it warns and is "
            "copied into vimpo_actor_coeff; both set to different values is refused."
        },
    )
    vimpo_gae_lambda: float = field(
        default=1.0,
        metadata={"help": "lambda of the reverse accumulation of rho - kappa into the actor advantage, in [0, 1]."},
    )
    vimpo_kl_estimator: str = field(
        default="exact",
        metadata={
            "help": "Per-token KL(pi_theta || pi_ref): 'exact' (full vocabulary, chunked), 'candidate_set' (the "
            "official approximation: sum of p (log p - log q) over the vimpo_candidate_kl_topk tokens of largest "
            "policy probability, p and q normalised over the full vocabulary), or the sampled estimators 'k2' / "
            "'k3'. 'k1' is refused: it makes rho - kappa identically zero.",
            "choices": list(KL_ESTIMATORS),
        },
    )
    vimpo_candidate_kl_topk: int = field(
        default=32,
        metadata={
            "help": "Candidate-set size of vimpo_kl_estimator='candidate_set' (official candidate_kl_topk). 32 is "
            "what the authors' run script passes (their yaml's 128 never took effect on that path); a larger set is "
            "closer to the exact KL at about the same cost."
        },
    )
    vimpo_kl_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Completion tokens per tile of the float32 pass of both LM heads (each head's (chunk, 32768) "
            "float32 tile is held at once; on CPU the fold's temporaries add about 3x that)."
        },
    )
    vimpo_value_loss_type: str = field(
        default="squared_error",
        metadata={
            "help": "Per-completion value loss of the terminal residual r: 'squared_error' (0.5 r^2) or 'huber' "
            "(0.5 r^2 for |r| <= delta, else delta (|r| - delta/2); gradient clamp(r, -delta, delta)).",
            "choices": list(VALUE_LOSS_TYPES),
        },
    )
    vimpo_value_huber_delta: float = field(
        default=0.005,
        metadata={
            "help": "Huber threshold delta (> 0) of vimpo_value_loss_type='huber'. 0.005 is the authors' run script "
            "value, the only one they ran (yaml 0.5, code fallback 1.0); residuals are in reward units and start at "
            "-(R - mean_g R), so with 0/1 rewards 0.005 is essentially an L1 loss (per-row gradient 0.005 sign(r)) "
            "while 0.5 or 1.0 are nearly the squared error."
        },
    )
    vimpo_value_type: str = field(
        default="raw",
        metadata={
            "help": "'raw' (the policy-implied value sum_t (rho - kappa)). The official 'soft' value is refused: its "
            "baseline needs every row's KL(pi_old || pi_ref) sum at generation time, a second scoring pass this "
            "trainer does not run (pure math: gnivo_trl.losses.soft_vimpo_value_loss)."
        },
    )
    vimpo_cap_v0: float | None = field(
        default=None,
        metadata={
            "help": "Upper bound on the per-prompt baseline: the value target is R - min(mean_g R, vimpo_cap_v0). "
            "None (default) does not cap."
        },
    )
    vimpo_update_ref_freq: int = field(
        default=0,
        metadata={
            "help": "Hard-copy the policy into the reference after every N generation batches (official training "
            "steps); 0 (default) never. TRL's SyncRefModelCallback schedule, copied one parameter at a time, with "
            "ref_model_mixup_alpha=1.0 and "
            "ref_model_sync_steps=N x optimizer steps per generation batch. Refused with PEFT."
        },
    )
    vimpo_dual_clip: float = field(
        default=10.0,
        metadata={"help": "Dual-clip constant c (> 1) bounding the actor loss of negative-advantage tokens."},
    )
    vimpo_adaptive_actor_coeff: bool = field(
        default=False,
        metadata={
            "help": "Replace vimpo_actor_coeff (then ignored) by the official adaptive coefficient alpha * "
            "EMA(value logit-gradient RMS) / (EMA(actor logit-gradient RMS at weight 1) + eps), updated per "
            "micro-batch. Works with every vimpo_kl_estimator (the official code keeps the fixed coefficient with "
            "k2/k3). The averages are not checkpointed: after a resume both restart from 0."
        },
    )
    vimpo_adaptive_actor_alpha: float = field(
        default=0.025,
        metadata={
            "help": "Target ratio alpha (>= 0) of the actor's to the value's logit-gradient RMS with "
            "vimpo_adaptive_actor_coeff. 0.025 is the authors' run script value; their yaml says 0.15."
        },
    )
    vimpo_adaptive_actor_ema_decay: float = field(
        default=0.9,
        metadata={"help": "Decay d in [0, 1) of both logit-gradient RMS averages of vimpo_adaptive_actor_coeff."},
    )
    vimpo_adaptive_actor_eps: float = field(
        default=1e-12,
        metadata={"help": "Added (> 0) to the actor average in the denominator of vimpo_adaptive_actor_coeff."},
    )

    def __post_init__(self):
        refusals = Refusals()  # every refused setting, reported together
        if self.beta != 0.0:
            refusals.add(
                "beta",
                self.beta,
                "VIMPO has no separate KL penalty: its KL coefficient lives inside the policy-implied value "
                "(vimpo_beta), and adding GRPO's would count the KL twice. Leave beta=0.0 and set vimpo_beta.",
            )
        if not self.vimpo_beta > 0:
            refusals.add(
                "vimpo_beta", self.vimpo_beta, "the value's KL coefficient must be > 0 (the paper uses 5e-4)."
            )
        self._apply_deprecated_actor_coef(refusals)
        if not self.vimpo_actor_coeff >= 0:
            refusals.add(
                "vimpo_actor_coeff", self.vimpo_actor_coeff, "use a weight >= 0 (0 is the value-only variant)."
            )
        if not 0.0 <= self.vimpo_gae_lambda <= 1.0:
            refusals.add("vimpo_gae_lambda", self.vimpo_gae_lambda, "lambda must lie in [0, 1] (the paper uses 1.0).")
        if self.vimpo_kl_estimator == "k1":
            refusals.add(
                "vimpo_kl_estimator",
                "k1",
                "the k1 estimate log pi/pi_ref makes rho - kappa identically zero, so VIMPO would learn nothing. "
                "Use 'exact' (default), 'candidate_set', 'k2' or 'k3'.",
            )
        if self.vimpo_kl_estimator not in KL_ESTIMATORS:
            refusals.add("vimpo_kl_estimator", self.vimpo_kl_estimator, f"choose one of {', '.join(KL_ESTIMATORS)}.")
        if not isinstance(self.vimpo_kl_chunk_size, int) or self.vimpo_kl_chunk_size < 1:
            refusals.add(
                "vimpo_kl_chunk_size", self.vimpo_kl_chunk_size, "use a positive number of tokens, e.g. 1024."
            )
        if not isinstance(self.vimpo_candidate_kl_topk, int) or self.vimpo_candidate_kl_topk < 1:
            refusals.add(
                "vimpo_candidate_kl_topk",
                self.vimpo_candidate_kl_topk,
                "use a positive number of candidate tokens (the authors ran 32).",
            )
        if self.vimpo_value_loss_type not in VALUE_LOSS_TYPES:
            refusals.add(
                "vimpo_value_loss_type", self.vimpo_value_loss_type, f"choose one of {', '.join(VALUE_LOSS_TYPES)}."
            )
        # Checked whatever the loss type, as the official code does, so a bad delta never waits for a later switch.
        if not (
            isinstance(self.vimpo_value_huber_delta, (int, float)) and 0 < self.vimpo_value_huber_delta < math.inf
        ):
            refusals.add(
                "vimpo_value_huber_delta",
                self.vimpo_value_huber_delta,
                "use a finite delta > 0 (the authors ran 0.005).",
            )
        if self.vimpo_value_type != "raw":
            fix = _SOFT_VALUE_FIX if self.vimpo_value_type == "soft" else "use 'raw' (the official default)."
            refusals.add("vimpo_value_type", self.vimpo_value_type, fix)
        if self.vimpo_cap_v0 is not None and not math.isfinite(self.vimpo_cap_v0):
            refusals.add(
                "vimpo_cap_v0", self.vimpo_cap_v0, "use a finite upper bound on the group-mean reward, or None."
            )
        if not isinstance(self.vimpo_update_ref_freq, int) or self.vimpo_update_ref_freq < 0:
            refusals.add(
                "vimpo_update_ref_freq",
                self.vimpo_update_ref_freq,
                "use a number of generation batches >= 1 between reference refreshes, or 0 (never).",
            )
        if not self.vimpo_dual_clip > 1.0:
            refusals.add(
                "vimpo_dual_clip", self.vimpo_dual_clip, "the dual-clip constant must be > 1 (the paper uses 10)."
            )
        self._check_adaptive_actor_coeff(refusals)
        if self.num_generations is None or self.num_generations < 2:
            refusals.add("num_generations", self.num_generations, "VIMPO centres rewards within a group; use K >= 2.")
        if self.sync_ref_model:
            refusals.add(
                "sync_ref_model",
                True,
                "VIMPO's reference is the frozen initial model, or a hard copy of the policy every N generation "
                "batches with vimpo_update_ref_freq=N (the official option); TRL's mixture of policy and reference "
                "is not VIMPO's. Leave sync_ref_model=False.",
            )
        if self.use_liger_kernel:
            refusals.add(
                "use_liger_kernel",
                self.use_liger_kernel,
                "Liger's kernels would replace the policy's layers but not the frozen reference's, so the two would "
                "differ by kernel rounding even while their weights are equal, and VIMPO's value (its log-ratio "
                "to the reference and the exact KL) would not start at 0. Leave use_liger_kernel=False; for faster "
                "layers use model_init_kwargs={'use_kernels': True}, which loads the policy and the reference "
                "alike.",
            )
        if self.use_bias_correction_kl:
            refusals.add(
                "use_bias_correction_kl",
                self.use_bias_correction_kl,
                "it corrects GRPO's KL penalty, which VIMPO does not have (beta=0). Leave it False (VIMPOConfig's "
                "default).",
            )
        check_common_grpo_options(self, "VIMPO", refusals)
        if (
            self.use_vllm
            and self.vllm_importance_sampling_correction
            and not self.vllm_importance_sampling_mode.startswith("sequence")
        ):
            refusals.add(
                "vllm_importance_sampling_mode",
                self.vllm_importance_sampling_mode,
                "VIMPO's value loss is a per-completion regression, so it needs a sequence-level ratio. Use "
                "'sequence_mask' (default) or 'sequence_truncate', or set vllm_importance_sampling_correction=False.",
            )
        refusals.run_grpo_post_init(super().__post_init__)
        if isinstance(self.vimpo_update_ref_freq, int) and self.vimpo_update_ref_freq > 0:
            self._derive_reference_refresh(refusals)
        if self.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
            refusals.add("fsdp", self.fsdp or "accelerate FSDP config", _FSDP_FIX)
        refusals.raise_if_any()

    def _apply_deprecated_actor_coef(self, refusals: Refusals) -> None:
        """Copy the deprecated `vimpo_actor_coef` into `vimpo_actor_coeff` (with a FutureWarning)."""
        if self.vimpo_actor_coef is None:
            return
        warnings.warn(
            "vimpo_actor_coef is deprecated and will be removed in the next release; use vimpo_actor_coeff (the "
            "name of the official VIMPO code and of TRL).",
            FutureWarning,
            stacklevel=4,  # the caller of VIMPOConfig(...): through the dataclass __init__ and __post_init__
        )
        coeff_set_by_user = type(self.vimpo_actor_coeff) is not _DefaultActorCoeff
        if coeff_set_by_user and self.vimpo_actor_coeff != self.vimpo_actor_coef:
            refusals.add(
                "vimpo_actor_coef",
                self.vimpo_actor_coef,
                f"it is the deprecated alias of vimpo_actor_coeff, which is set to {float(self.vimpo_actor_coeff)!r}. "
                "Set only vimpo_actor_coeff.",
            )
        self.vimpo_actor_coeff = float(self.vimpo_actor_coef)

    def _check_adaptive_actor_coeff(self, refusals: Refusals) -> None:
        """The `vimpo_adaptive_actor_*` settings, checked whether or not the option is on (as the Huber delta is)."""

        def is_real(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        alpha = self.vimpo_adaptive_actor_alpha
        if not (is_real(alpha) and alpha >= 0):
            refusals.add(
                "vimpo_adaptive_actor_alpha",
                alpha,
                "use a finite target ratio >= 0 of the actor's to the value's logit-gradient RMS (the authors' run "
                "script uses 0.025, their yaml 0.15).",
            )
        decay = self.vimpo_adaptive_actor_ema_decay
        if not (is_real(decay) and 0 <= decay < 1):
            refusals.add(
                "vimpo_adaptive_actor_ema_decay",
                decay,
                "use a decay in [0, 1) (the official default is 0.9; 0 uses each micro-batch's RMS as is).",
            )
        eps = self.vimpo_adaptive_actor_eps
        if not (is_real(eps) and eps > 0):
            refusals.add(
                "vimpo_adaptive_actor_eps",
                eps,
                "use a small finite eps > 0 that keeps the coefficient's denominator positive (official 1e-12).",
            )

    def _derive_reference_refresh(self, refusals: Refusals) -> None:
        """TRL's `SyncRefModelCallback` settings of `vimpo_update_ref_freq`: a hard copy (alpha 1) every N
        generation batches, counted in the optimizer steps the callback sees (`TrainerState.global_step`). A value of
        `ref_model_mixup_alpha` or `ref_model_sync_steps` set to something else would be overwritten: refused."""
        micro_steps = self.vimpo_update_ref_freq * self.steps_per_generation * self.num_iterations
        if micro_steps % self.gradient_accumulation_steps:
            refusals.add(
                "vimpo_update_ref_freq",
                self.vimpo_update_ref_freq,
                f"{self.vimpo_update_ref_freq} generation batches ({micro_steps} micro-steps: steps_per_generation="
                f"{self.steps_per_generation} x num_iterations={self.num_iterations}) do not end on an optimizer "
                f"step (gradient_accumulation_steps={self.gradient_accumulation_steps}), where the reference is "
                "refreshed. Use a multiple of gradient_accumulation_steps / (steps_per_generation x num_iterations).",
            )
            return
        derived = {
            "ref_model_mixup_alpha": 1.0,
            "ref_model_sync_steps": micro_steps // self.gradient_accumulation_steps,
        }
        for name, value in derived.items():
            if getattr(self, name) not in (GRPO_DEFAULTS[name], value):
                refusals.add(
                    name,
                    getattr(self, name),
                    f"with vimpo_update_ref_freq={self.vimpo_update_ref_freq} it is derived ({value}: a hard copy "
                    "every N generation batches, counted in optimizer steps) and would be overwritten. Leave it unset "
                    "and choose the refresh period with vimpo_update_ref_freq.",
                )
            setattr(self, name, value)


_SOFT_VALUE_FIX = (
    "the soft value's baseline is the group mean of R - beta * sum_t KL(pi_old || pi_ref), measured at generation "
    "time for every row of a group before any loss step; VIMPOTrainer scores both models only at loss time, per "
    "micro-batch, so it would need a second, generation-time pass of both models (and the official code allows "
    "'soft' only without the actor term). Use vimpo_value_type='raw' (the official default); the soft math is in "
    "gnivo_trl.losses.soft_value_baselines / soft_vimpo_value_loss."
)

_FSDP_FIX = (
    "VIMPO's scoring reads both LM heads directly and has not been tested under FSDP's sharded (DTensor) "
    "parameters (accelerate cannot run FSDP on CPU, where the test suite runs). Use DeepSpeed ZeRO-3 instead: "
    "accelerate launch --config_file examples/accelerate_configs/zero3.yaml, which is tested."
)


check_field_names(VIMPOConfig, "vimpo_")
