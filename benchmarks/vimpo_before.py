"""VIMPO's scoring path before issue 32, pinned for the benchmarks' "before" columns (not used by the package).

Until issue 32, `VIMPOTrainer._token_scores` ran TRL's fused forward of each model (`add_fused_lm_head`: the sampled
tokens' log-probs from `ChunkedLogProbFunction`, in the autocast dtype unless `cast_lm_head_to_fp32`), kept the
backbones' final hidden states with a forward hook, and projected both heads again for the KL: the exact KL with
TRL's `ChunkedDivergenceFunction`, the candidate-set KL with full-vocabulary log-softmaxes of both heads. Per
completion token that is 7 LM-head projections in a training step (the policy's fused head forward, its recomputed
tile and two gradient GEMMs in the backward, the reference's fused head, and both heads in the KL kernel).

The functions below are that code as it was at commit 19d62dc (`gnivo_trl/scoring.py` and the method
`VIMPOTrainer._token_scores`), with the package's names qualified; `use_path_before(trainer)` makes a
`VIMPOTrainer` score through it, as it did then (including the fused head GRPOTrainer installs, in the precision of
`cast_lm_head_to_fp32`, with `log_sum_sq_probs` for the adaptive actor weight). `benchmarks/flops.py` and
`benchmarks/overhead.py` use it to count and time the old path side by side with the new one in one run.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from trl.kernels.chunked_divergence import VOCAB_CHUNK_SIZE, ChunkedDivergenceFunction
from trl.trainer.utils import add_fused_lm_head, maybe_gather_lm_head_ctx

from gnivo_trl import scoring
from gnivo_trl._trl_private import trl_private
from gnivo_trl.group_bookkeeping import prompt_completion_sequences
from gnivo_trl.losses import candidate_set_kl_from_log_probs, token_kl_estimate
from gnivo_trl.vimpo_trainer import TokenScores

__all__ = ["token_scores_before", "use_path_before"]


class FusedForwardScores(NamedTuple):
    """What one fused forward of a model gives for the completion tokens of a batch.

    Attributes:
        log_probs: `(B, C)` float32 log-probabilities of the completion tokens, 0 where the token is not valid;
            differentiable when the forward ran with gradient.
        entropy: `(B, C)` entropy of the tempered distribution, or None when the head does not compute it.
        log_sum_sq_probs: `(B, C)` `log sum_v p_v^2` of the tempered distribution, or None likewise.
        aux_loss: the MoE router's load-balancing loss (0-d), or None unless router logits were requested.
        hidden: `(N, H)` final hidden states that predict the `N` valid completion tokens (row-major order),
            detached, on the device the backbone produced them.
    """

    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None
    aux_loss: torch.Tensor | None
    hidden: torch.Tensor


def fused_forward_scores(
    model: Callable[..., Any],
    causal_lm: torch.nn.Module,
    settings: scoring.FusedHeadSettings,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    valid: torch.Tensor,
    output_router_logits: bool = False,
) -> FusedForwardScores:
    """Score the completion tokens of `input_ids` with TRL's fused forward of `model`, as `GRPOTrainer` does.

    `model(input_ids=..., attention_mask=..., labels=..., fused_lm_head=True)` with the labels of the valid
    completion tokens (`-100` elsewhere): the backbone runs once and the head is projected in vocabulary tiles, so
    no `(B, T, V)` tensor exists. A forward hook on the backbone of `causal_lm` (`settings.backbone_attr`)
    keeps its final hidden states for the KL kernels. Runs with or without gradient as the caller's mode is, and
    under the caller's autocast.

    Args:
        model: what is called: `causal_lm` itself or a wrapper of it (DDP, a DeepSpeed engine, a PEFT model).
        causal_lm: the causal LM that carries TRL's fused head (under PEFT the base model).
        settings: `fused_head_settings` of `causal_lm`.
        input_ids: `(B, L)` prompt + completion ids; the completion is the last `C = valid.size(1)` positions.
        attention_mask: `(B, L)`.
        valid: `(B, C)` bool, the completion tokens to score.
        output_router_logits: ask a MoE model for its load-balancing loss.
    """
    num_completion = valid.size(1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -num_completion:] = input_ids[:, -num_completion:].masked_fill(~valid, -100)
    captured: list[torch.Tensor] = []

    def keep_final_hidden_states(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    kwargs = {"output_router_logits": True} if output_router_logits else {}
    backbone = getattr(causal_lm, settings.backbone_attr)
    handle = backbone.register_forward_hook(keep_final_hidden_states)
    try:
        outputs = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, **kwargs
        )
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"The backbone of {type(causal_lm).__name__} ran {len(captured)} times in one fused forward; expected "
            "once (TRL's add_fused_lm_head runs it once)."
        )

    def completion_part(values: torch.Tensor | None) -> torch.Tensor | None:
        return None if values is None else values[:, -num_completion:].float()

    hidden = captured[0][:, -num_completion - 1 : -1][valid.to(captured[0].device)].detach()
    return FusedForwardScores(
        completion_part(outputs.log_probs),
        completion_part(outputs.entropy),
        completion_part(outputs.log_sum_sq_probs),
        outputs.aux_loss if output_router_logits else None,
        hidden,
    )


def _projection_precision(settings: scoring.FusedHeadSettings, hidden: torch.Tensor):
    """The precision TRL's fused head projects in: float32 outside autocast with `cast_lm_head_to_fp32`."""
    if settings.cast_lm_head_to_fp32:
        return hidden.float(), torch.autocast(hidden.device.type, enabled=False)
    return hidden, contextlib.nullcontext()


def _per_chunk_with_gathered_heads(
    policy_hidden: torch.Tensor,
    policy_head: scoring.LMHead,
    policy_settings: scoring.FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_head: scoring.LMHead,
    ref_settings: scoring.FusedHeadSettings,
    chunk_size: int,
    chunk_kl: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """`chunk_kl(policy_chunk, policy_head, ref_chunk, ref_head) -> (n,)` over chunks of `chunk_size` tokens,
    float32 `(N,)` on the heads' device. Both heads are gathered (ZeRO-3) once around the whole loop, so every rank
    issues the same collectives however many tokens it holds; the hidden states move to the heads' device (the
    backbone of a split model can end elsewhere, as TRL's fused head allows) in the precision TRL's fused head
    projects in (float32 outside autocast with `cast_lm_head_to_fp32`)."""
    scoring.check_heads_on_one_device(policy_head, ref_head)
    device = policy_head.weight.device
    policy_hidden, precision = _projection_precision(policy_settings, policy_hidden.to(device))
    ref_hidden, _ = _projection_precision(ref_settings, ref_hidden.to(device))
    kl = torch.zeros(policy_hidden.size(0), device=device, dtype=torch.float32)
    with precision, maybe_gather_lm_head_ctx(*policy_head), maybe_gather_lm_head_ctx(*ref_head):
        for start in range(0, policy_hidden.size(0), chunk_size):
            stop = start + chunk_size
            kl[start:stop] = chunk_kl(policy_hidden[start:stop], policy_head, ref_hidden[start:stop], ref_head)
    return kl


@torch.no_grad()
def exact_token_kl(
    policy_hidden: torch.Tensor,
    policy_head: scoring.LMHead,
    policy_settings: scoring.FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_head: scoring.LMHead,
    ref_settings: scoring.FusedHeadSettings,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Exact per-token `KL(pi_theta || pi_ref)` over the full vocabulary at the sampling temperature, no gradient.

    TRL's `ChunkedDivergenceFunction` with `beta=1.0` (the reverse KL, the policy as student), called on chunks of
    `chunk_size` tokens: its working memory is two float32 `(min(chunk_size, 4096), 32768)` tiles (256 MiB at the
    default 1024 tokens), whatever the vocabulary. Both heads are gathered (ZeRO-3) once around the whole loop, so
    every rank issues the same collectives however many tokens it holds.

    Args:
        policy_hidden, ref_hidden: `(N, H)` final hidden states of each model that predict the same `N` tokens.
        policy_head, ref_head: the models' output projections (`output_head`), on one device.
        policy_settings, ref_settings: their `fused_head_settings`.
        chunk_size: tokens per kernel call.

    Returns:
        float32 `(N,)`, in nats.
    """

    def chunk_kl(policy_chunk, policy_head, ref_chunk, ref_head) -> torch.Tensor:
        kl, _ = ChunkedDivergenceFunction.apply(
            policy_chunk,
            *policy_head,
            ref_chunk,
            *ref_head,
            1.0,  # beta = 1: the reverse KL, KL(student || teacher) = KL(pi_theta || pi_ref)
            policy_settings.temperature,
            policy_settings.logit_scale,
            policy_settings.final_logit_softcapping,
            ref_settings.logit_scale,
            ref_settings.final_logit_softcapping,
        )
        return kl

    return _per_chunk_with_gathered_heads(
        policy_hidden, policy_head, policy_settings, ref_hidden, ref_head, ref_settings, chunk_size, chunk_kl
    )


def _log_probs(hidden: torch.Tensor, head: scoring.LMHead, settings: scoring.FusedHeadSettings) -> torch.Tensor:
    """Float32 `(n, V)` log-softmax of one head, with the numerics of the exact KL's kernel: TRL's
    `ChunkedDivergenceFunction` projection (hidden states and head rounded to the compute dtype, float32 logits,
    its vocabulary tiles), then its logit transform in float32 (`* logit_scale`, soft-cap `cap * tanh(z / cap)`,
    `* (1 / temperature)`), in place on one buffer."""
    module = "trl.kernels.chunked_divergence"
    compute_dtype, project = trl_private(module, "_compute_dtype"), trl_private(module, "_project")
    dtype = compute_dtype(hidden)
    hidden = hidden.to(dtype)
    vocab = head.weight.size(0)
    logits = torch.empty((hidden.size(0), vocab), device=hidden.device, dtype=torch.float32)
    for start in range(0, vocab, VOCAB_CHUNK_SIZE):
        end = min(start + VOCAB_CHUNK_SIZE, vocab)
        project(logits[:, start:end], hidden, head.weight, head.bias, start, end, dtype)
    logits.mul_(settings.logit_scale)
    if settings.final_logit_softcapping is not None:
        logits.div_(settings.final_logit_softcapping).tanh_().mul_(settings.final_logit_softcapping)
    logits.mul_(1 / settings.temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


@torch.no_grad()
def candidate_set_token_kl(
    policy_hidden: torch.Tensor,
    policy_head: scoring.LMHead,
    policy_settings: scoring.FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_head: scoring.LMHead,
    ref_settings: scoring.FusedHeadSettings,
    topk: int,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The official candidate-set approximation of per-token `KL(pi_theta || pi_ref)`, no gradient.

    Per token, `gnivo_trl.losses.candidate_set_kl_from_log_probs`: `sum_{v in C} p(v) (log p(v) - log q(v))`
    over the `topk` tokens `C` of largest policy probability, `p` and `q` normalised over the full
    vocabulary at the sampling temperature (both heads' logits transformed as TRL's fused head does). Computed on
    chunks of `chunk_size` tokens; each chunk holds three float32 `(chunk_size, V)` buffers (the two models'
    log-probabilities and a logsumexp temporary). The logits are projected as the exact KL's kernel projects them,
    so that over the whole vocabulary (`topk >= V`) this is `exact_token_kl` to float32 rounding.
    Both heads are gathered (ZeRO-3) once around the whole loop, so every rank issues the same collectives however
    many tokens it holds.

    Args:
        policy_hidden, ref_hidden: `(N, H)` final hidden states of each model that predict the same `N` tokens.
        policy_head, ref_head: the models' output projections (`output_head`), on one device.
        policy_settings, ref_settings: their `fused_head_settings`.
        topk: candidate-set size (`vimpo_candidate_kl_topk`); the whole vocabulary when larger.
        chunk_size: tokens per chunk.

    Returns:
        float32 `(N,)`, in nats (a truncated sum: can be slightly negative).
    """

    def chunk_kl(policy_chunk, policy_head, ref_chunk, ref_head) -> torch.Tensor:
        policy_log_probs = _log_probs(policy_chunk, policy_head, policy_settings)
        ref_log_probs = _log_probs(ref_chunk, ref_head, ref_settings)
        return candidate_set_kl_from_log_probs(policy_log_probs, ref_log_probs, topk)

    return _per_chunk_with_gathered_heads(
        policy_hidden, policy_head, policy_settings, ref_hidden, ref_head, ref_settings, chunk_size, chunk_kl
    )


def token_scores_before(self, model, inputs: dict[str, Any]) -> TokenScores:
    """`VIMPOTrainer._token_scores` at commit 19d62dc (bound to a trainer by `use_path_before`)."""
    input_ids, attention_mask, _ = prompt_completion_sequences(inputs)
    valid = inputs["completion_mask"].bool()
    ref_model, ref_context = self._reference_model()
    ref_lm = self._unwrapped_causal_lm(ref_model)
    with torch.no_grad(), ref_context, self.accelerator.autocast():
        ref = fused_forward_scores(ref_model, ref_lm, self._ref_head_settings, input_ids, attention_mask, valid)
        ref_head = scoring.output_head(ref_lm)
    policy_lm = self._unwrapped_causal_lm(model)
    with self.accelerator.autocast():
        policy = fused_forward_scores(
            model,
            policy_lm,
            self._policy_head_settings,
            input_ids,
            attention_mask,
            valid,
            output_router_logits=self.aux_loss_enabled,
        )
    estimator = self.args.vimpo_kl_estimator
    if estimator in ("exact", "candidate_set"):
        both_models = (
            policy.hidden,
            scoring.output_head(policy_lm),
            self._policy_head_settings,
            ref.hidden,
            ref_head,
            self._ref_head_settings,
        )
        with self.accelerator.autocast():
            if estimator == "exact":
                kl = exact_token_kl(*both_models, self.args.vimpo_kl_chunk_size)
            else:
                kl = candidate_set_token_kl(
                    *both_models, self.args.vimpo_candidate_kl_topk, self.args.vimpo_kl_chunk_size
                )
        token_kl = torch.zeros_like(policy.log_probs).masked_scatter(valid, kl.to(valid.device))
    else:
        token_kl = token_kl_estimate(policy.log_probs.detach(), ref.log_probs, estimator) * valid
    square_sums = None
    if self.args.vimpo_adaptive_actor_coeff:
        square_sums = torch.where(valid, policy.log_sum_sq_probs.detach().exp(), 0.0)
    return TokenScores(
        policy.log_probs, policy.entropy.detach(), ref.log_probs, token_kl, policy.aux_loss, square_sums
    )


def use_path_before(trainer) -> None:
    """Make `trainer` (a `VIMPOTrainer`, before it trains) score as before issue 32: GRPOTrainer's fused head on the
    policy in the precision of `cast_lm_head_to_fp32` (with `log_sum_sq_probs` for the adaptive actor weight, as the
    old constructor installed it), and `token_scores_before` as its `_token_scores`."""
    policy_lm = trainer._unwrapped_causal_lm(trainer.model)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs") if trainer.args.vimpo_adaptive_actor_coeff else None
    del policy_lm.forward
    add_fused_lm_head(
        policy_lm,
        temperature=trainer.temperature,
        cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32,
        outputs=outputs or ("log_probs", "entropy"),
    )
    trainer._policy_head_settings = scoring.fused_head_settings(policy_lm)
    trainer._token_scores = types.MethodType(token_scores_before, trainer)
