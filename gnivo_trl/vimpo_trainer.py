"""VIMPO as a TRL `GRPOTrainer` subclass.

Implementation notes (users read the class docstring and the VIMPO trainer page of the docs).

One scoring path, at loss time (`gnivo_trl.scoring`):

* Each model's backbone runs once, through the model's own wrapper so that DDP, DeepSpeed and PEFT act as in a
  forward: the reference's without gradient (the frozen model, or under PEFT the policy with its adapter disabled,
  whose LM head is read in that same context, so a head in `modules_to_save` is the original one), then, inside the
  policy's forward, the policy's backbone with gradient (and the MoE router's load-balancing loss where GRPO adds
  it, from the model's own `load_balancing_loss_func`). One tiled pass of both LM heads
  (`gnivo_trl.scoring.policy_reference_scores`, tiles of `vimpo_kl_chunk_size` tokens) projects each head once, in
  float32 whatever the autocast, and gives the sampled tokens' log-probabilities of both models, the policy's
  entropy and `sum_v p_v^2`, the exact KL and the candidate-set KL, all from the same logits; its backward
  recomputes the policy's tile only. `rho` and the KL are therefore exactly 0 while the policy equals the reference,
  and `rho` carries no bf16 rounding. No `(B, T, V)` tensor exists. Each model's logit transform is read once, at
  construction, off the forward TRL patched (through accelerate's mixed-precision wrapper); TRL's fused head on the
  policy, which computes the old log-probs at generation time, is installed again projecting in float32, so that
  the PPO ratio compares logits of one precision. Heads on different devices (a `device_map`) are refused at
  each loss step, before any forward: under DeepSpeed the policy is placed only in `train()`, so nothing about
  where the models sit is read at construction.
* `rho`, `kappa`, the advantage and its whitening come from that forward, per micro-batch, whitened over the
  micro-batch's valid tokens on every process, as the official code does. In TRL's default layout (one micro-batch
  holds the process's generation batch) this is whitening over the whole generation batch. Only the value
  target `R - mean_group(R)` is fixed at generation time, on whole groups, so the value loss does not depend on
  how the batch is split over micro-batches and processes; with gradient accumulation the actor term whitens
  each micro-batch on its own.
* Cost: one reference forward (as GRPO with `beta > 0`) and the policy's forward and backward (as GRPO); per
  completion token 5 LM-head projections, as GRPO with a reference (`benchmarks/results/flops/flops.md`). Nothing is
  computed at generation time.
* Rows without a reward (every reward function returned None) and rows masked by vLLM's sequence-level
  importance-sampling correction (`"sequence_mask"`, ratio 0) leave their group, as in GN-IVO: they are out of
  the group mean, the value loss, the actor loss and the whitening statistics. A non-zero sequence ratio
  (`"sequence_truncate"`) weights the actor's tokens only (and the actor's logit-gradient RMS of the adaptive
  weight), as the official code does: the value loss regresses each completion's implied value onto its reward
  unweighted. Token-level modes are refused by `VIMPOConfig`.
* A row whose tokens are all masked (a truncated completion with `mask_truncated_completions=True`) stays in its
  group's mean, as in GRPO, but has nothing to regress: it is out of the value loss and its denominator, and,
  having no token, out of the actor loss and the whitening. With every completion masked the loss is exactly 0.
* The actor loss is a token mean over the generation batch (TRL's `num_items_in_batch`), the value loss a mean
  over the generation batch's rows with a loss token (`vimpo_value_rows`, counted at generation time; `0.5 r^2` or
  Huber per row, `vimpo_value_loss_type`; a row without a reward adds 0), both scaled for accumulation; MoE models
  add their router's load-balancing loss as GRPO does.
* Options of the official code: `vimpo_cap_v0` caps the group-mean baseline of the value target;
  `vimpo_update_ref_freq=N` hard-copies the policy into the reference after every N generation batches, with
  TRL's `SyncRefModelCallback` (alpha 1, every N x optimizer steps per generation batch; refused with PEFT), which
  under ZeRO-3 copies one parameter at a time (`ParameterwiseSyncRefModelCallback`) instead of gathering both models.
* `vimpo_adaptive_actor_coeff` (official `compute_vimpo_adaptive_actor_coeff`) replaces `vimpo_actor_coeff`
  by `alpha * EMA_value / (EMA_actor + eps)`, computed per micro-batch before its loss. Both losses depend on a
  position's tempered logits only through `log p_y`, so each one's logit gradient there is `c_t (e_y - p)`
  with norm `|c_t| sqrt(1 - 2 p_y + sum_v p_v^2)`: for the value loss
  `c_t = vimpo_beta * g(r_i) * w_i / B_micro` (`g(r) = r`, or `clamp(r, +-delta)` for Huber; `w_i` 1 for a row
  with a reward and a loss token, else 0; `B_micro` the micro-batch's rows with a loss token), for the actor loss
  at weight 1 the derivative of the per-token dual-clip loss (times the importance ratio) divided by this process's valid tokens in the micro-batch (the official token mean), by
  autograd, so that clipping and the dual clip count exactly. Each RMS over the valid tokens of every process feeds an EMA without bias correction (decay
  `vimpo_adaptive_actor_ema_decay`); a micro-batch without actor gradient gets coefficient 0 and leaves the
  EMAs unchanged. `sum_v p_v^2` comes from the same pass of the policy's head as its log-probabilities. The EMAs live on the trainer, start at 0
  and are not checkpointed: after a resume both restart from 0, which changes only the smoothing (they restart
  together). Evaluation uses `alpha * EMA_value / (EMA_actor + eps)` and updates nothing. Unlike the official
  code, which silently keeps the fixed coefficient with the k2/k3 KL, it works with every KL estimator.
"""

from __future__ import annotations

import contextlib
import logging
import math
import textwrap
from typing import Any, NamedTuple

import torch
from trl import GRPOTrainer
from trl.trainer import add_fused_lm_head

from . import scoring
from ._config_checks import fail
from ._trl_private import profiled, trl_private
from .group_bookkeeping import (
    GroupBookkeepingMixin,
    ParameterwiseSyncRefModelCallback,
    loss_mask,
    prompt_completion_sequences,
)
from .losses import (
    adaptive_actor_coeff,
    dual_clip_ppo_loss,
    logit_gradient_norm_factors,
    logit_gradient_rms_terms,
    masked_mean_std,
    token_kl_estimate,
    vimpo_advantages,
    vimpo_reward_baselines,
    vimpo_terminal_residuals,
    vimpo_value_loss_from_residuals,
    vimpo_value_residual_gradient,
    whiten,
)
from .vimpo_config import _FSDP_FIX, VIMPOConfig

__all__ = ["TokenScores", "VIMPOTrainer"]

logger = logging.getLogger(__name__)

# The fixed actor weight dominates the value when vimpo_beta * (mean completion length) / vimpo_actor_coeff is below
# this: the value loss's logit gradient per token scales with beta, the token-mean actor's with
# vimpo_actor_coeff / length. Measured in benchmarks/results/fair_comparison/learning_vimpo_map.md (docs/vimpo_trainer.md,
# "Tips").
ACTOR_BALANCE_WARNING_THRESHOLD = 20.0


class TokenScores(NamedTuple):
    """Per-token scores of a micro-batch's completion tokens, each `(B, C)` and 0 where the completion is padding.

    Attributes:
        logp: log pi_theta of the sampled tokens, float32, differentiable (the loss's only gradient path).
        entropy: entropy of pi_theta at each position, float32, detached.
        ref_logp: log pi_ref of the sampled tokens, float32, no gradient.
        token_kl: per-token KL(pi_theta || pi_ref) in nats, float32, no gradient: exact (full vocabulary), the
            official candidate-set approximation, or the k2/k3 estimate, as `vimpo_kl_estimator` says.
        aux_loss: the MoE load-balancing loss of the policy forward (0-d, differentiable), or None.
        probability_square_sums: `sum_v p_v^2` of pi_theta's tempered distribution at each position, float32, no
            gradient, for `vimpo_adaptive_actor_coeff`; None when that option is off.
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    ref_logp: torch.Tensor
    token_kl: torch.Tensor
    aux_loss: torch.Tensor | None
    probability_square_sums: torch.Tensor | None = None


class VIMPOTrainer(GroupBookkeepingMixin, GRPOTrainer):
    """Trainer for Value-Implicit Policy Optimization (VIMPO), a drop-in subclass of TRL's `GRPOTrainer`.

    VIMPO ([Kang et al., 2026](https://arxiv.org/abs/2606.20008)) reads a value function off the policy itself,
    relative to the frozen initial model. Per token, `rho = beta * log(pi_theta / pi_ref)` and
    `kappa = beta * KL(pi_theta || pi_ref)`. The policy-implied terminal value `sum_t (rho - sg[kappa])` is regressed
    onto the group-centred reward `R - mean_group(R)` (the value loss), and a dual-clip PPO actor follows the
    reward-free advantage `sum_l lambda^l (rho - kappa)_{t+l}`, whitened per micro-batch. The total loss is
    `L_V + vimpo_actor_coeff * L_A`, with the semantics of the authors' official implementation. The KL is exact over
    the full vocabulary, computed in chunks on TRL's kernels, without a `(B, T, V)` tensor. Everything else is
    `GRPOTrainer`'s: generation, reward functions, DeepSpeed ZeRO, PEFT, logging, checkpoints and Hub pushes.

    The [VIMPO trainer page](https://gnivo-trl.github.io/gnivo-trl/vimpo_trainer/) explains the scoring path, the KL
    estimators, the logged metrics, what is refused, the options of the official code, and the beta x length rule
    that keeps the authors' defaults from collapsing training on short answers.

    Args:
        model (str | PreTrainedModel): The policy, as for `GRPOTrainer`: a Hub id, a local directory or a loaded
            causal LM. The frozen reference is built from it (a copy of a model instance; the base model under the
            adapter with PEFT).
        reward_funcs (Callable | list[Callable] | str | None): The reward functions, as for `GRPOTrainer`; None with
            an `environment_factory` whose environments score their rollouts.
        args (VIMPOConfig): The configuration. Defaults to `VIMPOConfig("<model name>-VIMPO")`. A plain `GRPOConfig`
            is refused (`TypeError`): it lacks the `vimpo_*` fields.
        **kwargs (Any): Every other `GRPOTrainer` argument (`train_dataset`, `processing_class`, `peft_config`,
            `tools`, `environment_factory`, `callbacks`, ...).

    Examples:
        ```python
        from gnivo_trl import VIMPOConfig, VIMPOTrainer
        from gnivo_trl.data import load_math_dataset
        from gnivo_trl.rewards import math_accuracy_reward

        trainer = VIMPOTrainer(
            model="Qwen/Qwen3-4B-Base",
            reward_funcs=math_accuracy_reward,
            # vimpo_beta 5e-2 for answers of about 50 tokens (the beta x length rule)
            args=VIMPOConfig(output_dir="qwen-vimpo", vimpo_beta=5e-2),
            train_dataset=load_math_dataset("guru_math"),
        )
        trainer.train()
        ```
    """

    _tag_names = ["trl", "vimpo"]
    _name = "VIMPO"
    _paper = {
        "title": "VIMPO: Value-Implicit Policy Optimization for LLMs",
        "id": "2606.20008",
        "citation": textwrap.dedent("""\
            @article{kang2026vimpo,
                title        = {{VIMPO: Value-Implicit Policy Optimization for LLMs}},
                author       = {Zhewei Kang and Aosong Feng and Sergey Levine and Dawn Song and Xuandong Zhao},
                year         = 2026,
                eprint       = {arXiv:2606.20008},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: VIMPOConfig | None = None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config.name_or_path
            args = VIMPOConfig(f"{model_name.split('/')[-1]}-VIMPO")
        elif not isinstance(args, VIMPOConfig):
            raise TypeError(
                f"args must be a VIMPOConfig, got {type(args).__name__}. Build one with VIMPOConfig(...): it carries "
                "every GRPOConfig field plus the vimpo_* fields."
            )
        super().__init__(model, reward_funcs, args=args, **kwargs)
        if self.is_fsdp_enabled:  # VIMPOConfig refuses FSDP; this catches a plugin set up some other way
            raise ValueError(f"fsdp is not supported: {_FSDP_FIX}")
        if self._is_vlm:
            raise ValueError(
                f"VIMPOTrainer does not support vision-language models yet (processing_class is a "
                f"{type(self.processing_class).__name__}): its scoring has not been tested with image inputs. Train "
                "a text-only model, or use GNIVOTrainer, which scores through TRL's own forward."
            )
        prompt_learning = [
            type(config).__name__
            for config in getattr(self.model, "peft_config", {}).values()
            if getattr(config, "is_prompt_learning", False)
        ]
        if prompt_learning:
            raise ValueError(
                f"VIMPOTrainer does not support prompt-learning PEFT methods (peft_config is a {prompt_learning[0]}): "
                "VIMPO scores from the backbone's final hidden states, and prompt tuning, prefix tuning and P-tuning "
                "act through the virtual tokens PeftModel.forward prepends, so their parameters would get no "
                "gradient. Use a weight-based adapter such as LoRA (peft.LoraConfig)."
            )
        policy_lm = self._unwrapped_causal_lm(self.model)
        # VIMPO scores at loss time from float32 logits (gnivo_trl.scoring); the policy's log-probs TRL computes at
        # generation time (old log-probs with num_iterations > 1 or vLLM's importance-sampling correction) must come
        # from float32 logits too, or the PPO ratio would carry the rounding of bf16 logit tiles: install TRL's fused
        # head again in place of GRPO's, same temperature and outputs, projecting in float32.
        del policy_lm.forward
        add_fused_lm_head(
            policy_lm, temperature=self.temperature, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy")
        )
        # Read once, here: accelerate wraps the models' forwards under mixed precision. Where the models sit is not:
        # under DeepSpeed the reference is placed now and the policy only in train() (checked in _token_scores).
        ref_model, _ = self._reference_model()
        self._policy_head_settings = scoring.fused_head_settings(policy_lm)
        self._ref_head_settings = scoring.fused_head_settings(self._unwrapped_causal_lm(ref_model))
        # vimpo_adaptive_actor_coeff's EMAs of the value's and the unscaled actor's logit-gradient RMS (official
        # initial value 0.0); not checkpointed, as in the official code.
        self._adaptive_value_rms_ema = 0.0
        self._adaptive_actor_rms_ema = 0.0
        self._actor_balance_checked = False
        if self.args.vimpo_update_ref_freq:
            self._add_reference_refresh()

    def _needs_reference_model(self, config) -> bool:
        return True  # the frozen reference is inside VIMPO's value; GRPO's own KL term (beta) stays off

    def _add_reference_refresh(self) -> None:
        """`vimpo_update_ref_freq`: TRL's `SyncRefModelCallback`, as `GRPOTrainer` adds it for
        `sync_ref_model`, with the hard-copy settings [`VIMPOConfig`][gnivo_trl.VIMPOConfig] derived
        (`ref_model_mixup_alpha=1`, `ref_model_sync_steps` = N generation batches in optimizer steps); under ZeRO-3
        one parameter at a time (`ParameterwiseSyncRefModelCallback`)."""
        if self.ref_model is None:  # PEFT: the reference is the policy with its adapter disabled (or a "ref" adapter)
            fail(
                "vimpo_update_ref_freq",
                self.args.vimpo_update_ref_freq,
                "with PEFT the reference is the base model under the adapter (or a frozen 'ref' adapter), not a "
                "separate model that a copy of the policy could replace; a refresh would have to merge the adapter "
                "into the base weights (the official code refuses LoRA here too). Use vimpo_update_ref_freq=0 with "
                "PEFT, or train all the weights.",
            )
        self.add_callback(ParameterwiseSyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))

    # ------------------------------------------------------------------------------------------------------------
    # Generation time: the value targets, on whole groups
    # ------------------------------------------------------------------------------------------------------------

    def _add_group_statistics(self, output, global_rewards, local, group_size, mode) -> None:
        ratio = output.get("importance_sampling_ratio")
        if ratio is not None:
            # A row masked by vLLM's sequence-level importance sampling (ratio 0) leaves its group like a row without
            # reward: out of the group mean, both losses and the whitening statistics (as in GN-IVO).
            global_ratio = self._gather_rows(ratio.reshape(-1).float())
            global_rewards = global_rewards.masked_fill(global_ratio == 0, float("nan"))
        # R - min(mean_g R, vimpo_cap_v0): the plain group-centred reward when the cap is None (the default). A row
        # whose tokens are all masked (mask_truncated_completions) keeps its reward in its group's mean, as in GRPO.
        baselines = vimpo_reward_baselines(global_rewards, group_size, self.args.vimpo_cap_v0)
        targets = global_rewards.float() - baselines
        output["vimpo_value_target"] = targets[local]
        # The value loss's denominator: the generation batch's rows with at least one loss token, counted here as TRL
        # counts its tokens (num_items_in_batch). A row without a reward counts (it adds 0), as its tokens count in
        # the actor's token mean, so the scale does not depend on how many rewards are missing; a row whose tokens
        # are all masked (mask_truncated_completions) has nothing to regress and does not.
        output["vimpo_value_rows"] = self._gather_rows(loss_mask(output).sum(dim=1) > 0).sum()

    # ------------------------------------------------------------------------------------------------------------
    # Loss time: both models' scores from the current forward
    # ------------------------------------------------------------------------------------------------------------

    def _unwrapped_causal_lm(self, model) -> torch.nn.Module:
        """The transformers causal LM inside a DDP / DeepSpeed wrapper and a PEFT model (whose forward TRL patched)."""
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped

    def _reference_model(self):
        """`(model, context)`: what computes the reference, and the context in which it does. Under PEFT the
        policy with its adapter disabled (or the frozen "ref" adapter of a pre-trained adapter), as GRPO scores its
        reference; the reference's LM head must be read inside that context too, since a head in
        `modules_to_save` is the trainable copy while the adapter is enabled."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        peft_model = self.accelerator.unwrap_model(self.model)
        use_adapter = trl_private("trl.trainer.utils", "use_adapter")
        return self.model, use_adapter(peft_model, "ref" if "ref" in peft_model.peft_config else None)

    @profiled
    def _token_scores(self, model, inputs: dict[str, Any]) -> TokenScores:
        """Both models' scores of a micro-batch's completion tokens (see `TokenScores`).

        Each model's backbone runs once, through the model's own wrapper (`gnivo_trl.scoring.call_through`): the
        reference's without gradient, in the context that selects it (under PEFT the adapter disabled; its LM head
        is read there too); then, inside the policy's forward, the policy's backbone (with the MoE router loss where
        GRPO adds it) and one float32 pass of both LM heads (`gnivo_trl.scoring.policy_reference_scores`), which
        gives every score from the same logits. Every rank runs the same forwards and the same head gathers whatever
        its token count, so the collectives of DeepSpeed ZeRO-3 match across processes.
        """
        input_ids, attention_mask, _ = prompt_completion_sequences(inputs)
        valid = inputs["completion_mask"].bool()
        targets = inputs["completion_ids"][valid]
        ref_model, ref_context = self._reference_model()
        ref_unwrapped = self.accelerator.unwrap_model(ref_model, keep_torch_compile=False)
        ref_lm = self._unwrapped_causal_lm(ref_model)
        ref_settings, settings = self._ref_head_settings, self._policy_head_settings
        policy_lm = self._unwrapped_causal_lm(model)
        policy_head = scoring.output_head(policy_lm)  # outside the reference's context: the trained head
        with torch.no_grad(), ref_context, self.accelerator.autocast():
            ref_head = scoring.output_head(ref_lm)  # inside the context: the frozen head, also in modules_to_save
            # Here, before any forward, where both models are placed (DeepSpeed places the policy in train()): a
            # device_map set them apart.
            scoring.check_heads_on_one_device(policy_head, ref_head)
            ref = scoring.call_through(
                ref_model,
                ref_unwrapped,
                lambda **sequences: scoring.completion_hidden_states(ref_lm, ref_settings, valid=valid, **sequences),
                input_ids=input_ids,
                attention_mask=attention_mask,
            )
        estimator = self.args.vimpo_kl_estimator

        def policy_forward(**sequences):
            policy = scoring.completion_hidden_states(
                policy_lm, settings, valid=valid, output_router_logits=self.aux_loss_enabled, **sequences
            )
            scores = scoring.policy_reference_scores(
                policy.hidden,
                scoring.output_head(policy_lm),
                settings,
                ref.hidden,
                ref_head,
                ref_settings,
                targets,
                candidate_topk=self.args.vimpo_candidate_kl_topk if estimator == "candidate_set" else None,
                probability_square_sums=self.args.vimpo_adaptive_actor_coeff,
                chunk_size=self.args.vimpo_kl_chunk_size,
            )
            return scores, policy.aux_loss

        with self.accelerator.autocast():
            scores, aux_loss = scoring.call_through(
                model,
                self.accelerator.unwrap_model(model, keep_torch_compile=False),
                policy_forward,
                input_ids=input_ids,
                attention_mask=attention_mask,
            )

        def per_position(values: torch.Tensor) -> torch.Tensor:
            # masked_scatter keeps the policy's log-probs connected to the model even with no valid token (as TRL's
            # fused head does), so every rank runs the same backward.
            return values.new_zeros(valid.shape).masked_scatter(valid, values.to(valid.device))

        logp, ref_logp = per_position(scores.log_probs), per_position(scores.ref_log_probs)
        if estimator == "exact":
            token_kl = per_position(scores.kl)
        elif estimator == "candidate_set":
            token_kl = per_position(scores.candidate_kl)
        else:  # k2 / k3, from the sampled tokens' log-probs
            token_kl = token_kl_estimate(logp.detach(), ref_logp, estimator) * valid
        square_sums = None
        if self.args.vimpo_adaptive_actor_coeff:  # every estimator, unlike the official code (k2/k3 skip it)
            square_sums = per_position(scores.probability_square_sums)
        return TokenScores(logp, per_position(scores.entropy), ref_logp, token_kl, aux_loss, square_sums)

    @torch.no_grad()
    def _whitened_advantages(self, scores: TokenScores, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """VIMPO's reward-free advantage `(B, C)` of this micro-batch, whitened over its valid tokens on every
        process (every rank must call this). Logs `vimpo/advantage_std` and `vimpo/kl`."""
        advantages = vimpo_advantages(
            scores.logp.detach(),
            scores.ref_logp,
            scores.token_kl,
            mask,
            self.args.vimpo_beta,
            self.args.vimpo_gae_lambda,
        )
        mean, std = masked_mean_std(advantages, mask, lambda tensor: self.accelerator.reduce(tensor, reduction="sum"))
        self._metrics[mode]["vimpo/advantage_std"].append(std.item())
        self._log_mean_over_processes(mode, "vimpo/kl", (scores.token_kl * mask).sum(), mask.sum())
        return whiten(advantages, mask, mean, std)

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    @profiled
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        scores = self._token_scores(model, inputs)
        logp = scores.logp
        targets = inputs["vimpo_value_target"]
        has_reward = ~torch.isnan(targets)  # False also for rows masked by vLLM's importance sampling
        # vLLM's sequence-level importance ratio weights the actor's tokens only (and the actor's logit-gradient RMS
        # of the adaptive weight), as in the official code: the value loss regresses each completion's implied value
        # onto its reward whatever policy sampled it. A row the ratio masks (0) has left its group (no reward).
        is_ratio = inputs.get("importance_sampling_ratio")
        has_tokens = loss_mask(inputs).sum(dim=1) > 0  # False for a truncated row with mask_truncated_completions
        mask = loss_mask(inputs) * has_reward[:, None]
        in_value_loss = has_reward & has_tokens
        row_weight = in_value_loss.float()
        if mode == "train" and not self._actor_balance_checked:
            self._check_actor_balance(mask)
        advantages = self._whitened_advantages(scores, mask, mode)

        residuals = vimpo_terminal_residuals(
            logp,
            scores.ref_logp,
            scores.token_kl,
            mask,
            torch.nan_to_num(targets, nan=0.0),
            self.args.vimpo_beta,
        )
        per_row = vimpo_value_loss_from_residuals(
            residuals, self.args.vimpo_value_loss_type, self.args.vimpo_value_huber_delta
        )
        # Mean over the generation batch's rows with a loss token: this micro-batch's share, summed over the
        # accumulation window and averaged over processes.
        value_loss_sum = (row_weight * per_row).sum()
        value_loss = value_loss_sum / self._row_mean_normalizer(inputs, mode)

        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old  # TRL omits it when the policy has not moved
        per_token = dual_clip_ppo_loss(
            logp, old, advantages, self.epsilon_low, self.epsilon_high, self.args.vimpo_dual_clip
        )
        if is_ratio is not None:
            per_token = per_token * is_ratio
        actor_loss = (per_token * mask).sum() / self._token_mean_normalizer(inputs, mode)
        actor_coeff = self.args.vimpo_actor_coeff
        if self.args.vimpo_adaptive_actor_coeff:
            actor_coeff = self._adaptive_actor_coeff(
                scores, mask, residuals, row_weight, has_tokens.sum(), old, advantages, is_ratio, mode
            )
        loss = value_loss + actor_coeff * actor_loss
        loss = self._add_aux_loss(loss, scores.aux_loss, mode)

        self._log_metrics(
            mode, scores, residuals.detach(), in_value_loss, mask, per_token.detach(), logp, old, advantages
        )
        # 0, not NaN, when no row takes part (every completion truncated): the loss is 0 then, as GRPO's.
        self._log_mean_over_processes(mode, "vimpo/value_loss", value_loss_sum, has_tokens.sum(), empty=0.0)
        return loss

    def _row_mean_normalizer(self, inputs: dict[str, Any], mode: str) -> torch.Tensor:
        """Divisor that makes a per-micro-batch sum over rows the mean over the generation batch's rows with a loss
        token: `_token_mean_normalizer`'s rule with rows (`vimpo_value_rows`) in place of tokens."""
        normalizer = inputs["vimpo_value_rows"].float().clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _check_actor_balance(self, mask: torch.Tensor) -> None:
        """Warn once, on the first training micro-batch, when a fixed actor weight will outweigh the value loss.

        Per token, the value loss's gradient scales with `vimpo_beta` and the token-mean actor's with
        `vimpo_actor_coeff / L` (`L` the mean completion length in model tokens, measured here over every
        process), so the balance is `vimpo_beta * L / vimpo_actor_coeff`. The paper's defaults on its long responses
        give several hundred; below `ACTOR_BALANCE_WARNING_THRESHOLD` training collapsed in our measurements
        (`benchmarks/results/fair_comparison/learning_vimpo_map.md`). Every rank must call this.
        """
        self._actor_balance_checked = True
        args = self.args
        if args.vimpo_adaptive_actor_coeff or args.vimpo_actor_coeff == 0:
            return
        counts = torch.stack([mask.sum(), (mask.sum(dim=1) > 0).sum()]).float()
        tokens, rows = self.accelerator.reduce(counts, reduction="sum").tolist()
        if rows == 0:
            return
        mean_length = tokens / rows
        balance = args.vimpo_beta * mean_length / args.vimpo_actor_coeff
        if balance < ACTOR_BALANCE_WARNING_THRESHOLD:
            logger.warning(
                "VIMPO's actor term will likely dominate its value loss: vimpo_beta * (mean completion length) / "
                "vimpo_actor_coeff = %g * %.1f / %g = %.3g, below %g. With a fixed actor weight, training collapsed in "
                "this regime in our measurements (benchmarks/results/fair_comparison/learning_vimpo_map.md; these "
                "weights reach %g only on completions of %.0f tokens or more). Raise vimpo_beta to at least %.2g, lower "
                "vimpo_actor_coeff, or set vimpo_adaptive_actor_coeff=True.",
                args.vimpo_beta,
                mean_length,
                args.vimpo_actor_coeff,
                balance,
                ACTOR_BALANCE_WARNING_THRESHOLD,
                ACTOR_BALANCE_WARNING_THRESHOLD,
                ACTOR_BALANCE_WARNING_THRESHOLD * args.vimpo_actor_coeff / args.vimpo_beta,
                ACTOR_BALANCE_WARNING_THRESHOLD * args.vimpo_actor_coeff / mean_length,
            )

    @torch.no_grad()
    def _adaptive_actor_coeff(
        self, scores, mask, residuals, row_weight, rows, old, advantages, is_ratio, mode
    ) -> float:
        """`vimpo_adaptive_actor_coeff`: this micro-batch's actor weight from both losses' logit-gradient RMS over
        the valid tokens of every process (every rank must call this). Training updates the EMAs; evaluation uses
        the current `alpha * EMA_value / (EMA_actor + eps)`. Logs the `vimpo/*logit_grad_rms*` metrics.

        Per-token derivatives with respect to `log p_y` (`(B, C)`, detached), without accumulation scaling, which
        both terms share: the value loss's `beta * g(r_i) * w_i / B_micro` (`B_micro` the micro-batch's rows with a
        loss token); the actor loss's at weight 1 as the
        official token mean over this process's valid tokens of the micro-batch, by autograd on a detached copy of
        `logp` (nothing of the model's graph is used or kept).
        """
        args = self.args
        logp = scores.logp.detach()
        residual_gradient = vimpo_value_residual_gradient(
            residuals, args.vimpo_value_loss_type, args.vimpo_value_huber_delta
        )
        rows = rows.float().clamp(min=1.0)  # the micro-batch's rows with a loss token (the official mean over rows)
        value_coeffs = (args.vimpo_beta * residual_gradient * row_weight / rows)[:, None].expand_as(logp)
        with torch.enable_grad():  # this method, and evaluation's whole loss, run under no_grad
            leaf = logp.clone().requires_grad_()
            per_token = dual_clip_ppo_loss(
                leaf, old, advantages, self.epsilon_low, self.epsilon_high, args.vimpo_dual_clip
            )
            if is_ratio is not None:
                per_token = per_token * is_ratio
            (actor_coeffs,) = torch.autograd.grad((per_token * mask).sum(), leaf)
        actor_coeffs = actor_coeffs / mask.sum().clamp(min=1.0)
        factors = logit_gradient_norm_factors(logp, scores.probability_square_sums)
        terms = torch.cat(
            [
                logit_gradient_rms_terms(value_coeffs, factors, mask),
                logit_gradient_rms_terms(actor_coeffs, factors, mask),
            ]
        )
        # One reduction for both RMS: every process sees the same values (and hence the same coefficient).
        value_squares, count, actor_squares, _ = self.accelerator.reduce(terms, reduction="sum").tolist()
        value_rms = math.sqrt(value_squares / count) if count > 0 else 0.0
        actor_rms = math.sqrt(actor_squares / count) if count > 0 else 0.0
        alpha, eps = args.vimpo_adaptive_actor_alpha, args.vimpo_adaptive_actor_eps
        if mode == "train":
            coeff, self._adaptive_value_rms_ema, self._adaptive_actor_rms_ema = adaptive_actor_coeff(
                self._adaptive_value_rms_ema,
                self._adaptive_actor_rms_ema,
                value_rms,
                actor_rms,
                alpha,
                args.vimpo_adaptive_actor_ema_decay,
                eps,
            )
        else:
            coeff = alpha * self._adaptive_value_rms_ema / (self._adaptive_actor_rms_ema + eps)
        metrics = self._metrics[mode]
        metrics["vimpo/value_logit_grad_rms"].append(value_rms)
        metrics["vimpo/actor_logit_grad_rms_unscaled"].append(actor_rms)
        metrics["vimpo/actor_logit_grad_rms"].append(actor_rms * coeff)
        metrics["vimpo/adaptive_actor_ema_value_logit_grad_rms"].append(self._adaptive_value_rms_ema)
        metrics["vimpo/adaptive_actor_ema_actor_logit_grad_rms_unscaled"].append(self._adaptive_actor_rms_ema)
        metrics["vimpo/actor_coeff"].append(coeff)
        metrics["vimpo/actor_to_value_logit_grad_rms_ratio"].append(actor_rms * coeff / (value_rms + 1e-12))
        return coeff

    def _log_metrics(self, mode, scores, residuals, in_value_loss, mask, per_token, logp, old, advantages) -> None:
        """Actor loss, moments of the residuals of the rows in the value loss, entropy and GRPO's clip ratios, each
        reduced over processes."""
        self._log_mean_over_processes(mode, "vimpo/actor_loss", (per_token * mask).sum(), mask.sum())
        counted = in_value_loss.float()
        moments = torch.stack(
            [
                counted.sum(),
                torch.where(in_value_loss, residuals, 0.0).sum(),
                torch.where(in_value_loss, residuals.square(), 0.0).sum(),
            ]
        )
        count, total, total_sq = self.accelerator.reduce(moments, reduction="sum").tolist()
        mean = total / count if count else float("nan")
        self._metrics[mode]["vimpo/residual_mean"].append(mean)
        self._metrics[mode]["vimpo/residual_std"].append(
            max(total_sq / count - mean * mean, 0.0) ** 0.5 if count else float("nan")
        )
        self._log_mean_over_processes(mode, "entropy", (scores.entropy * mask).sum(), mask.sum())
        ratio = torch.exp(logp.detach().float() - old.detach().float())
        low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        for name, clipped in (("low_mean", low), ("high_mean", high), ("region_mean", low | high)):
            self._log_mean_over_processes(mode, f"clip_ratio/{name}", (clipped.float() * mask).sum(), mask.sum())
