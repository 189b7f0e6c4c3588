"""VIMPO as a TRL ``GRPOTrainer`` subclass."""

from __future__ import annotations

import contextlib
import textwrap
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id, maybe_gather_lm_head_ctx, use_adapter

from .group_bookkeeping import GroupBookkeepingMixin, loss_mask, prompt_completion_sequences
from .losses import (
    chunked_token_statistics,
    dual_clip_ppo_loss,
    group_centered_rewards,
    masked_mean_std,
    token_kl_estimate,
    vimpo_advantages,
    vimpo_terminal_residuals,
    whiten,
)
from .vimpo_config import VIMPOConfig

__all__ = ["VIMPOTrainer"]

# GRPOTrainer builds the frozen reference model (a copy, or a "ref" adapter for a pre-trained PEFT adapter, prepared
# for DeepSpeed / FSDP) only when beta != 0. VIMPO needs that reference with GRPO's KL penalty off, so construction
# runs with this stand-in beta and then restores 0.0.
_BUILD_REFERENCE_BETA = 1.0


class VIMPOTrainer(GroupBookkeepingMixin, GRPOTrainer):
    """Trainer for Value-Implicit Policy Optimization (VIMPO), as the authors' official implementation computes it.

    VIMPO (Kang et al., 2026) reads a value function off the policy itself: per token ``rho = beta * log(pi_theta /
    pi_ref)`` and ``kappa = beta * KL(pi_theta || pi_ref)``; the policy-implied terminal value
    ``sum_t (rho - sg[kappa])`` is regressed onto the group-centred reward ``R - mean_group(R)`` (value loss), and a
    PPO-clipped actor (dual clip) follows the reward-free advantage ``A_t = sum_l lambda^l (rho - kappa)_{t+l}``,
    whitened over the batch. Total loss ``L_V + vimpo_actor_coef * L_A`` (SPEC section 4).

    Design decisions (recorded here and in the README):

    * The reference is the frozen initial model, created although ``beta`` is 0 (or, with PEFT, the model with its
      adapter disabled / a frozen "ref" copy of a pre-trained adapter, exactly as GRPO with ``beta > 0``).
    * ``kappa``, ``log pi_ref`` and the whitened advantage are computed once per generation batch, without gradient,
      from the policy that sampled it (as PPO fixes its advantages at rollout time). The exact KL runs over the full
      vocabulary in chunks of ``vimpo_kl_chunk_size`` tokens, so no ``(B, T, V)`` float32 tensor exists. With one
      optimizer step per generation batch (the paper's setting, TRL's default) the sampling policy *is* the current
      policy, so this equals the official implementation; with ``num_iterations > 1`` those detached quantities stay
      at the sampling policy while ``rho`` follows the current one. Whitening statistics cover every valid token of
      the generation batch on every process, so the gradient does not depend on how the batch is split over
      micro-batches and processes. With several generation rounds per optimizer step (``steps_per_generation <
      gradient_accumulation_steps``) each round whitens its own advantages and takes its own token mean, as TRL's
      GRPO normalises per generation batch; the value loss is layout-independent in every case.
    * What scoring costs depends on the layout. In TRL's default layout (one micro-batch holds the process's whole
      generation batch: ``steps_per_generation == 1``, ``num_iterations == 1``; and in evaluation) scoring runs only
      the reference's backbone, as GRPO with ``beta > 0`` does; the loss step takes the policy's log-probs and final
      hidden states from the forward it runs anyway, computes the scores (both LM heads in chunks for the exact KL;
      for k2/k3 nothing but the estimate) and whitens them before the loss, so VIMPO adds no policy forward. Where TRL
      itself computes old log-probs at scoring time (vLLM's importance-sampling correction, ``num_iterations > 1``),
      that no-grad policy forward *is* VIMPO's scoring pass: the old log-probs come out of the same pass, so VIMPO
      adds only the reference and the KL. With gradient accumulation over several micro-batches of one generation
      batch (and no old log-probs), a scoring pass runs one no-grad policy forward of its own, because the whole
      batch's advantages must be whitened before the first micro-step. All paths compute the same scores (tested).
    * The loss-time forward is GRPO's (the fused LM head, no logits); the value loss is a mean over rows and the actor
      loss a token mean over the generation batch (TRL's ``num_items_in_batch``), both scaled for accumulation.
    * A row without a reward (every reward function returned None) contributes to neither loss. With vLLM's
      sequence-level importance-sampling correction, the ratio weights the row's value term and the actor's tokens
      (and a masked ratio removes the row); token-level modes are refused by :class:`VIMPOConfig`.

    Logged metrics (reduced over processes): ``vimpo/value_loss``, ``vimpo/actor_loss``, ``vimpo/residual_mean`` and
    ``vimpo/residual_std`` (terminal-value residual ``sum_t (rho - kappa) - (R - mean_g R)`` over the rows of a
    micro-batch on all processes, averaged over the micro-batches of a logging interval like every TRL metric),
    ``vimpo/kl`` (mean per-token KL to the reference), ``vimpo/advantage_std`` (before whitening), ``entropy``.
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
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = VIMPOConfig(f"{model_name.split('/')[-1]}-VIMPO")
        elif not isinstance(args, VIMPOConfig):
            raise TypeError(
                f"args must be a VIMPOConfig, got {type(args).__name__}. Build one with VIMPOConfig(...): it carries "
                "every GRPOConfig field plus the vimpo_* fields."
            )
        args.beta = _BUILD_REFERENCE_BETA
        try:
            super().__init__(model, reward_funcs, args=args, **kwargs)
        finally:
            args.beta = 0.0
        self.beta = 0.0  # no GRPO KL term and no reference forward in GRPO's own generation step
        # Set while _generate_and_score_completions runs; holds the scores of TRL's old-log-prob forward, if it ran.
        self._scoring_generation_batch, self._scored_sequences = False, None

    # ------------------------------------------------------------------------------------------------------------
    # Generation time: reference log-probs, KL, value targets and whitened advantages of the generation batch
    # ------------------------------------------------------------------------------------------------------------

    def _reference_context(self):
        """Context in which ``self._causal_lm(reference=True)`` computes the reference model (PEFT: adapter off)."""
        if self.ref_model is not None:
            return contextlib.nullcontext()
        model = self.accelerator.unwrap_model(self.model)
        return use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)

    def _causal_lm(self, reference: bool):
        """The transformers causal LM whose backbone and output embedding compute policy or reference logits."""
        model = self.ref_model if reference and self.ref_model is not None else self.model
        model = getattr(model, "module", model)  # DeepSpeed engine / DDP wrapper
        return model.get_base_model() if is_peft_model(model) else model

    def _head(self, reference: bool):
        """Callable mapping final hidden states to the policy's or the reference's logits (see :func:`_head_logits`)."""
        return _head_logits(
            self._causal_lm(reference),
            context=self._reference_context if reference else contextlib.nullcontext,
            float32=self.args.cast_lm_head_to_fp32,
        )

    def _completion_hidden_states(
        self, reference: bool, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion: int
    ) -> torch.Tensor:
        """``(B, C, H)`` final hidden states of the policy or the reference that predict the last ``C`` tokens.

        One backbone forward in the accelerator's autocast, like TRL's own forwards; call it without gradient.
        """
        lm = self._causal_lm(reference)
        with self._reference_context() if reference else contextlib.nullcontext(), self.accelerator.autocast():
            states = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return _completion_positions(states.last_hidden_state, num_completion)

    def _score_sequences(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(policy_logp, ref_logp, exact_kl)`` of the last ``num_completion`` tokens, each ``(B, C)`` float32.

        One backbone forward of each model per ``batch_size`` rows (in the accelerator's autocast, like TRL's own
        forwards), then both LM heads over the completion tokens in chunks of ``vimpo_kl_chunk_size`` tokens: no
        ``(B, T, V)`` tensor exists. Values are 0 where ``attention_mask`` is 0. ``exact_kl`` is None for the sampled
        estimators (k2/k3), which need only the two log-probs. Run without gradient.
        """
        policy_head, ref_head = self._head(reference=False), self._head(reference=True)
        with_kl = self.args.vimpo_kl_estimator == "exact"
        completion_ids = input_ids[:, -num_completion:]
        results = torch.zeros(3 if with_kl else 2, *completion_ids.shape, device=input_ids.device)
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            valid = attention_mask[rows, -num_completion:].bool()
            policy_hidden, ref_hidden = (
                self._completion_hidden_states(reference, input_ids[rows], attention_mask[rows], num_completion)[valid]
                for reference in (False, True)
            )
            statistics = chunked_token_statistics(
                policy_hidden,
                ref_hidden,
                completion_ids[rows][valid],
                policy_head,
                ref_head,
                temperature=self.temperature,
                chunk_size=self.args.vimpo_kl_chunk_size,
                with_kl=with_kl,
            )
            for index, values in enumerate(statistics[: results.size(0)]):
                results[index, rows][valid] = values
        return results[0], results[1], (results[2] if with_kl else None)

    def _generate_and_score_completions(self, inputs):
        # While TRL scores the generation batch, its own no-grad policy forward (old log-probs: vLLM's importance
        # sampling correction, num_iterations > 1) is answered by _score_sequences, which runs the reference beside
        # it, so VIMPO adds no policy forward of its own in those settings (see _get_per_token_logps_and_entropies).
        self._scoring_generation_batch, self._scored_sequences = True, None
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._scoring_generation_batch, self._scored_sequences = False, None

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal_inputs,
    ):
        if (
            self._scoring_generation_batch
            and model is self.model
            and not torch.is_grad_enabled()
            and not compute_entropy
            and not compute_aux_loss
            and all(value is None for value in multimodal_inputs.values())
        ):
            statistics = self._score_sequences(
                input_ids, attention_mask, logits_to_keep, batch_size or input_ids.size(0)
            )
            self._scored_sequences = (input_ids, attention_mask, statistics)
            return statistics[0], None, None
        return super()._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=batch_size,
            compute_entropy=compute_entropy,
            compute_aux_loss=compute_aux_loss,
            **multimodal_inputs,
        )

    def _sampled_token_statistics(self, output: dict[str, Any], mask: torch.Tensor, batch_size: int):
        """``(policy_logp, ref_logp, token_kl)``, each ``(B, C)`` float32 and 0 where ``mask`` is 0.

        Reuses the scores of TRL's old-log-prob forward of this generation batch when it ran, else scores now.
        """
        input_ids, attention_mask, num_completion = prompt_completion_sequences(output)
        scored = self._scored_sequences
        if scored is not None and torch.equal(scored[0], input_ids) and torch.equal(scored[1], attention_mask):
            policy_logp, ref_logp, exact_kl = scored[2]
        else:
            policy_logp, ref_logp, exact_kl = self._score_sequences(
                input_ids, attention_mask, num_completion, batch_size
            )
        valid = mask.bool()
        if exact_kl is None:
            exact_kl = token_kl_estimate(policy_logp, ref_logp, self.args.vimpo_kl_estimator)
        zero = torch.zeros((), device=valid.device)
        return tuple(torch.where(valid, values, zero) for values in (policy_logp, ref_logp, exact_kl))

    def _scores_policy_in_loss_forward(self, mode: str) -> bool:
        """Whether the policy's side of this generation batch's scores comes from the loss-time forward.

        True when one micro-batch holds the process's whole generation batch and the policy cannot move before it is
        used (evaluation, or ``steps_per_generation == 1`` with ``num_iterations == 1``: TRL's default layout), unless
        TRL's own old-log-prob forward already scored the batch (vLLM's importance sampling), whose scores are reused.
        Then scoring runs only the reference's backbone, as GRPO with ``beta > 0`` does, and :meth:`_compute_loss`
        takes the policy's log-probs and final hidden states from the forward it runs anyway, so VIMPO adds no policy
        forward of its own.
        """
        if self._scored_sequences is not None:
            return False
        return mode == "eval" or (self.args.steps_per_generation == 1 and self.num_iterations == 1)

    def _add_group_statistics(self, output, global_rewards, local, group_size, mode) -> None:
        mask = loss_mask(output)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        targets = group_centered_rewards(global_rewards, group_size)[local]
        output["vimpo_value_target"] = targets
        if self._scores_policy_in_loss_forward(mode):
            with torch.no_grad():
                if self.args.vimpo_kl_estimator == "exact":
                    output["vimpo_ref_hidden"] = self._reference_hidden_states(output, batch_size)
                else:
                    output["vimpo_ref_logps"] = self._reference_token_logps(output, batch_size)
            return
        with torch.no_grad():
            policy_logp, ref_logp, token_kl = self._sampled_token_statistics(output, mask, batch_size)
        output.update(self._actor_scores(policy_logp, ref_logp, token_kl, mask, targets, mode))

    def _reference_hidden_states(self, output: dict[str, Any], batch_size: int) -> torch.Tensor:
        """``(B, C, H)`` reference final hidden states that predict the completion tokens (any value at padding).

        One reference backbone forward per ``batch_size`` rows; its LM head runs beside the policy's at loss time, in
        chunks (:meth:`_loss_scores`), for the exact KL.
        """
        input_ids, attention_mask, num_completion = prompt_completion_sequences(output)
        return torch.cat(
            [
                self._completion_hidden_states(
                    True,
                    input_ids[start : start + batch_size],
                    attention_mask[start : start + batch_size],
                    num_completion,
                )
                for start in range(0, input_ids.size(0), batch_size)
            ]
        )

    def _reference_token_logps(self, output: dict[str, Any], batch_size: int) -> torch.Tensor:
        """``(B, C)`` reference log-probs of the completion tokens (any value at padding): GRPO's own reference forward.

        TRL's fused head, like the loss-time policy log-probs these are compared with: while the policy equals the
        reference both come out of the same computation, so ``rho`` and the k2/k3 estimate are exactly 0 (whitening
        would blow rounding differences up to unit-scale advantages).
        """
        input_ids, attention_mask, num_completion = prompt_completion_sequences(output)
        model = self.ref_model if self.ref_model is not None else self.model
        with self._reference_context():
            ref_logp, _, _ = super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                num_completion,
                batch_size=batch_size,
                **self._multimodal_inputs(output),
            )
        return ref_logp

    def _actor_scores(
        self,
        policy_logp: torch.Tensor,
        ref_logp: torch.Tensor,
        token_kl: torch.Tensor,
        mask: torch.Tensor,
        targets: torch.Tensor,
        mode: str,
    ) -> dict[str, torch.Tensor]:
        """Reference log-probs, per-token KL and whitened actor advantages of a generation batch, each ``(B, C)``.

        Inputs are detached float32 ``(B, C)``, 0 where ``mask`` is 0; ``targets`` ``(B,)`` is NaN for rows without a
        reward, which the actor leaves out. Whitening statistics cover every process (every rank must call this).
        Logs ``vimpo/advantage_std`` and ``vimpo/kl``.
        """
        actor_mask = mask * ~torch.isnan(targets)[:, None]
        advantages = vimpo_advantages(
            policy_logp, ref_logp, token_kl, actor_mask, self.args.vimpo_beta, self.args.vimpo_gae_lambda
        )
        mean, std = masked_mean_std(
            advantages, actor_mask, lambda tensor: self.accelerator.reduce(tensor, reduction="sum")
        )
        self._metrics[mode]["vimpo/advantage_std"].append(std.item())
        self._log_mean_over_processes(mode, "vimpo/kl", (token_kl * mask).sum(), mask.sum())
        return {
            "vimpo_ref_logps": ref_logp,
            "vimpo_token_kl": token_kl,
            "vimpo_advantages": whiten(advantages, actor_mask, mean, std),
        }

    @contextlib.contextmanager
    def _keeping_policy_hidden_states(self, keep: bool):
        """Collects (detached) the policy backbone's final hidden states ``(B, L, H)`` of the forwards run inside."""
        captured: list[torch.Tensor] = []
        if not keep:
            yield captured
            return

        def store(module, args, output):
            captured.append(output.last_hidden_state.detach())

        handle = self._causal_lm(reference=False).base_model.register_forward_hook(store)
        try:
            yield captured
        finally:
            handle.remove()

    @torch.no_grad()
    def _loss_scores(
        self, inputs: dict[str, Any], logp: torch.Tensor, policy_hidden: torch.Tensor | None, mode: str
    ) -> dict[str, torch.Tensor]:
        """:meth:`_actor_scores` of a batch scored by the loss-time forward (see :meth:`_scores_policy_in_loss_forward`).

        ``logp`` ``(B, C)`` is that forward's policy log-probs (used detached) and ``policy_hidden`` ``(B, C, H)`` its
        final hidden states that predict the completion tokens (needed by the exact KL only); the reference's hidden
        states come from scoring time. Both LM heads run in chunks of ``vimpo_kl_chunk_size`` tokens.
        """
        mask = loss_mask(inputs)
        if self.args.vimpo_kl_estimator == "exact":
            # Both models' log-probs from the same chunked heads (not TRL's fused head): while the policy equals the
            # reference, rho and the KL are then exactly 0, as at scoring time, instead of whitened rounding noise.
            valid = inputs["completion_mask"].bool()
            statistics = chunked_token_statistics(
                policy_hidden[valid],
                inputs["vimpo_ref_hidden"][valid],
                inputs["completion_ids"][valid],
                self._head(reference=False),
                self._head(reference=True),
                temperature=self.temperature,
                chunk_size=self.args.vimpo_kl_chunk_size,
            )
            policy_logp, ref_logp, token_kl = (torch.zeros_like(logp, dtype=torch.float32) for _ in range(3))
            for scores, values in zip((policy_logp, ref_logp, token_kl), statistics):
                scores[valid] = values
        else:
            policy_logp, ref_logp = logp.detach().float(), inputs["vimpo_ref_logps"].float()
            token_kl = token_kl_estimate(policy_logp, ref_logp, self.args.vimpo_kl_estimator)
        policy_logp, ref_logp, token_kl = (
            torch.where(mask.bool(), values, 0.0) for values in (policy_logp, ref_logp, token_kl)
        )
        return self._actor_scores(policy_logp, ref_logp, token_kl, mask, inputs["vimpo_value_target"], mode)

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        scored_here = "vimpo_advantages" not in inputs  # see _scores_policy_in_loss_forward
        needs_hidden = scored_here and self.args.vimpo_kl_estimator == "exact"
        with self._keeping_policy_hidden_states(needs_hidden) as hidden:
            logp, entropies = self._policy_token_logps(model, inputs)
        if scored_here:
            if needs_hidden and len(hidden) != 1:
                raise RuntimeError(
                    f"Expected one policy backbone forward in the loss step, saw {len(hidden)}: the exact KL needs the "
                    "final hidden states of the forward that computed the log-probs."
                )
            policy_hidden = _completion_positions(hidden[0], logp.size(1)) if needs_hidden else None
            inputs = {**inputs, **self._loss_scores(inputs, logp, policy_hidden, mode)}
        targets = inputs["vimpo_value_target"]
        has_reward = ~torch.isnan(targets)
        row_weight = has_reward.float()
        is_ratio = inputs.get("importance_sampling_ratio")
        if is_ratio is not None:
            row_weight = row_weight * is_ratio.reshape(-1).float()
        mask = loss_mask(inputs) * has_reward[:, None]

        residuals = vimpo_terminal_residuals(
            logp,
            inputs["vimpo_ref_logps"],
            inputs["vimpo_token_kl"],
            mask,
            torch.nan_to_num(targets, nan=0.0),
            self.args.vimpo_beta,
        )
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # Mean over the rows of the optimizer step's batch: this micro-batch's share, summed over accumulation.
        value_loss = (row_weight * 0.5 * residuals.square()).sum() / logp.size(0)

        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old  # TRL omits it when the policy has not moved
        per_token = dual_clip_ppo_loss(
            logp, old, inputs["vimpo_advantages"], self.epsilon_low, self.epsilon_high, self.args.vimpo_dual_clip
        )
        if is_ratio is not None:
            per_token = per_token * is_ratio
        actor_loss = (per_token * mask).sum() / self._token_mean_normalizer(inputs, mode)
        loss = value_loss / accumulation + self.args.vimpo_actor_coef * actor_loss

        num_rows = torch.tensor(float(logp.size(0)), device=logp.device)
        residuals = residuals.detach()
        counted = has_reward.float()
        self._log_mean_over_processes(mode, "vimpo/value_loss", value_loss.detach() * logp.size(0), num_rows)
        self._log_mean_over_processes(mode, "vimpo/actor_loss", (per_token.detach() * mask).sum(), mask.sum())
        moments = torch.stack(
            [
                counted.sum(),
                torch.where(has_reward, residuals, 0.0).sum(),
                torch.where(has_reward, residuals.square(), 0.0).sum(),
            ]
        )
        count, total, total_sq = self.accelerator.reduce(moments, reduction="sum").tolist()
        mean = total / count if count else float("nan")
        self._metrics[mode]["vimpo/residual_mean"].append(mean)
        self._metrics[mode]["vimpo/residual_std"].append(
            max(total_sq / count - mean * mean, 0.0) ** 0.5 if count else float("nan")
        )
        self._log_mean_over_processes(mode, "entropy", (entropies.detach() * mask).sum(), mask.sum())
        return loss


def _completion_positions(states: torch.Tensor, num_completion: int) -> torch.Tensor:
    """The ``(B, C, H)`` hidden states of ``(B, L, H)`` that predict the last ``C`` tokens (position p predicts p + 1)."""
    return states[:, -num_completion - 1 : -1]


def _head_logits(causal_lm, context=contextlib.nullcontext, float32: bool = False):
    """Callable mapping final hidden states to logits like the model's own head (scale and soft-cap included).

    ``context`` is entered around each call (the reference's adapter-disabled context under PEFT, so that an
    adapted LM head is computed without its adapter for the reference only). ``float32`` projects in float32
    outside autocast, as TRL's fused head does with ``cast_lm_head_to_fp32``: it reads the head's base weight (cast
    once per scoring pass, gathered first under ZeRO-3), so, like TRL's fused head, it applies no adapter of the head
    itself and ``context`` is not needed.
    """
    head = causal_lm.get_output_embeddings()
    text_config = causal_lm.config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    float32_weights = []

    def project(hidden: torch.Tensor) -> torch.Tensor:
        if not float32:
            with context():
                return head(hidden)
        if not float32_weights:  # a float32 copy of the head for this scoring pass (ZeRO-3: gathered first)
            with maybe_gather_lm_head_ctx(head.weight, head.bias):
                bias = None if head.bias is None else head.bias.float()
                float32_weights.append((head.weight.float(), bias))
        weight, bias = float32_weights[0]
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), weight, bias)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        values = project(hidden)
        if scale is not None:
            values = values * scale
        if softcap is not None:
            values = torch.tanh(values / softcap) * softcap
        return values

    return logits
