"""Per-token scores of completion tokens on TRL's own kernels: log-probabilities, entropy and the exact KL.

VIMPO needs, at every completion position, the sampled token's log-probability under the policy (with gradient) and
under the frozen reference, and the exact full-vocabulary `KL(pi_theta || pi_ref)`. None of these may materialise
`(B, T, V)` logits. TRL 1.16 ships the two kernels that compute them from final hidden states and the LM heads, in
vocabulary tiles:

* `trl.kernels.ChunkedLogProbFunction`, the kernel behind GRPO's fused LM head (`add_fused_lm_head`): the
  sampled tokens' log-probabilities and the entropy, differentiable;
* `trl.kernels.chunked_divergence.ChunkedDivergenceFunction`, the kernel of TRL's `DistillationTrainer`: with
  `beta=1.0` the reverse KL `KL(student || teacher)`, here `KL(pi_theta || pi_ref)` with the policy as student.

The official code's candidate-set KL (a top-k over the whole vocabulary) has no TRL kernel: it is computed here in
chunks of tokens from both heads' full logits, transformed exactly as TRL's fused head transforms them, and so is
the policy's `sum_v p_v^2` that VIMPO's adaptive actor coefficient needs.

This module feeds them the way TRL does: the backbone's final hidden states (read from the backbone TRL's fused head
uses, every multimodal or MoE input passed through), the head's weight and bias gathered under DeepSpeed ZeRO-3 once
per call and entered by every rank (never once per chunk), and the logit transform (scale, soft-cap, temperature,
float32 head) that TRL's `add_fused_lm_head` installed on that very model, read off the forward it patched rather
than re-derived from a list of config attribute names that would drift from TRL's.

The functions take plain causal LMs (the model inside any PEFT / DDP / DeepSpeed wrapper); routing through those
wrappers is the trainer's job.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.kernels.chunked_divergence import _compute_dtype as _divergence_compute_dtype
from trl.kernels.chunked_divergence import _project as _divergence_project
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .losses import candidate_set_kl_from_log_probs

__all__ = [
    "FusedHeadSettings",
    "candidate_set_token_kl",
    "completion_positions",
    "exact_token_kl",
    "fused_head_settings",
    "last_hidden_state",
    "token_log_probs",
    "token_probability_square_sums",
]

# Vocabulary entries per tile of TRL's fused head (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16): the same
# tiling, so that these log-probabilities round as GRPO's do.
_VOCAB_TILE = 32768


class FusedHeadSettings(NamedTuple):
    """What TRL's fused LM head applies between the final hidden states and the softmax of one model.

    Attributes:
        temperature: the logits are divided by it (GRPO's `temperature`).
        logit_scale: multiplies the logits before the soft-cap (Cohere's `logit_scale`, Granite's
            `1 / logits_scaling`, Falcon-H1's `lm_head_multiplier`, ...; 1.0 for most models).
        final_logit_softcapping: `softcap * tanh(logits / softcap)` when not None (Gemma 2).
        cast_lm_head_to_fp32: the head projects in float32, outside autocast.
        backbone_attr: attribute of the causal LM holding the backbone that TRL's fused head runs.
    """

    temperature: float
    logit_scale: float
    final_logit_softcapping: float | None
    cast_lm_head_to_fp32: bool
    backbone_attr: str


def fused_head_settings(causal_lm: torch.nn.Module) -> FusedHeadSettings:
    """The settings TRL's `add_fused_lm_head` installed on `causal_lm` (read off the forward it patched).

    `GRPOTrainer` adds the fused head to the policy (the base model under PEFT) and to the reference model at
    construction; the values it derived from the model's config live in that forward's closure. Reading them there
    keeps every model family TRL supports (and future ones) exactly as TRL treats them.

    Raises:
        RuntimeError: if `causal_lm.forward` is not TRL's fused forward.
    """
    forward = getattr(causal_lm.forward, "__func__", causal_lm.forward)
    names = getattr(getattr(forward, "__code__", None), "co_freevars", ())
    needed = ("temperature", "logit_scale", "final_logit_softcapping", "cast_lm_head_to_fp32", "backbone_attr")
    if not all(name in names for name in needed):
        raise RuntimeError(
            f"{type(causal_lm).__name__}.forward is not TRL's fused LM-head forward (trl.trainer.utils."
            "add_fused_lm_head), which GRPOTrainer installs on the policy and the reference at construction. Score "
            "with models prepared by the trainer, or call add_fused_lm_head(model, temperature, ...) first."
        )
    values = inspect.getclosurevars(forward).nonlocals
    return FusedHeadSettings(*(values[name] for name in needed))


def last_hidden_state(
    causal_lm: torch.nn.Module,
    settings: FusedHeadSettings,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    **model_inputs: Any,
) -> Any:
    """Run the backbone TRL's fused head runs and return its output (`last_hidden_state`, `router_logits`, ...).

    `model_inputs` go to the backbone unchanged: multimodal inputs (`pixel_values`, ...) and
    `output_router_logits` for MoE models. Runs with or without gradient, as the caller's mode is.
    """
    backbone = getattr(causal_lm, settings.backbone_attr)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs)


def completion_positions(states: torch.Tensor, num_completion: int) -> torch.Tensor:
    """The `(B, C, H)` states of `(B, L, H)` that predict the last `C` tokens (position p predicts p + 1)."""
    return states[:, -num_completion - 1 : -1]


def _head_parameters(causal_lm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = causal_lm.get_output_embeddings()
    return head.weight, head.bias


def _head_context(settings: FusedHeadSettings, hidden: torch.Tensor):
    """The precision TRL's fused head projects in: float32 outside autocast with `cast_lm_head_to_fp32`."""
    if settings.cast_lm_head_to_fp32:
        return hidden.float(), torch.autocast(hidden.device.type, enabled=False)
    return hidden, contextlib.nullcontext()


def token_log_probs(
    hidden: torch.Tensor,
    causal_lm: torch.nn.Module,
    settings: FusedHeadSettings,
    labels: torch.Tensor,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of `labels` (and the entropy) under `causal_lm`'s head, exactly as TRL's fused head.

    Args:
        hidden: `(N, H)` final hidden states that predict the `N` tokens; gradient flows through them (and the
            head's weight) when enabled.
        causal_lm: the model whose output embedding is the head (under ZeRO-3 it is gathered once for the call, and
            once more by the kernel's backward).
        settings: `fused_head_settings` of that model.
        labels: `(N,)` token ids.
        with_entropy: also return the entropy of the tempered distribution (no gradient).

    Returns:
        `(log_probs, entropy)`, float32 `(N,)`; `entropy` is None unless asked for.
    """
    weight, bias = _head_parameters(causal_lm)
    hidden, precision = _head_context(settings, hidden)
    outputs = ("log_probs", "entropy") if with_entropy else ("log_probs",)
    with precision, maybe_gather_lm_head_ctx(weight, bias):
        log_probs, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden,
            weight,
            bias,
            labels,
            settings.temperature,
            _VOCAB_TILE,
            settings.final_logit_softcapping,
            settings.logit_scale,
            outputs,
        )
    return log_probs, (entropy.detach() if entropy is not None else None)


def _per_chunk_with_gathered_heads(
    policy_hidden: torch.Tensor,
    policy_lm: torch.nn.Module,
    policy_settings: FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_lm: torch.nn.Module,
    ref_settings: FusedHeadSettings,
    chunk_size: int,
    chunk_kl: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """`chunk_kl(policy_chunk, (weight, bias), ref_chunk, (weight, bias)) -> (n,)` over chunks of `chunk_size`
    tokens, float32 `(N,)`. Both heads are gathered (ZeRO-3) once around the whole loop, so every rank issues the
    same collectives however many tokens it holds; the hidden states are in the precision TRL's fused head projects
    in (float32 outside autocast with `cast_lm_head_to_fp32`)."""
    policy_head, ref_head = _head_parameters(policy_lm), _head_parameters(ref_lm)
    policy_hidden, precision = _head_context(policy_settings, policy_hidden)
    ref_hidden, _ = _head_context(ref_settings, ref_hidden)
    kl = torch.zeros(policy_hidden.size(0), device=policy_hidden.device, dtype=torch.float32)
    with precision, maybe_gather_lm_head_ctx(*policy_head), maybe_gather_lm_head_ctx(*ref_head):
        for start in range(0, policy_hidden.size(0), chunk_size):
            stop = start + chunk_size
            kl[start:stop] = chunk_kl(policy_hidden[start:stop], policy_head, ref_hidden[start:stop], ref_head)
    return kl


@torch.no_grad()
def exact_token_kl(
    policy_hidden: torch.Tensor,
    policy_lm: torch.nn.Module,
    policy_settings: FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_lm: torch.nn.Module,
    ref_settings: FusedHeadSettings,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Exact per-token `KL(pi_theta || pi_ref)` over the full vocabulary at the sampling temperature, no gradient.

    TRL's `ChunkedDivergenceFunction` with `beta=1.0` (the reverse KL, the policy as student), called on chunks of
    `chunk_size` tokens: its working memory is two float32 `(min(chunk_size, 4096), 32768)` tiles (256 MiB at the
    default 1024 tokens), whatever the vocabulary. Both heads are gathered (ZeRO-3) once around the whole loop, so
    every rank issues the same collectives however many tokens it holds.

    Args:
        policy_hidden, ref_hidden: `(N, H)` final hidden states of each model that predict the same `N` tokens.
        policy_lm, ref_lm: the models whose output embeddings are the heads (the same model for a PEFT reference).
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
        policy_hidden, policy_lm, policy_settings, ref_hidden, ref_lm, ref_settings, chunk_size, chunk_kl
    )


def _log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, settings: FusedHeadSettings):
    """Float32 `(n, V)` log-softmax of one head, with the numerics of the exact KL's kernel: TRL's
    `ChunkedDivergenceFunction` projection (hidden states and head rounded to the compute dtype, float32 logits,
    vocabulary tiles of `_VOCAB_TILE`), then its logit transform in float32 (`_torch_transform`:
    `* logit_scale`, soft-cap `cap * tanh(z / cap)`, `* (1 / temperature)`), in place on one buffer."""
    dtype = _divergence_compute_dtype(hidden)
    hidden = hidden.to(dtype)
    vocab = weight.size(0)
    logits = torch.empty((hidden.size(0), vocab), device=hidden.device, dtype=torch.float32)
    for start in range(0, vocab, _VOCAB_TILE):
        end = min(start + _VOCAB_TILE, vocab)
        _divergence_project(logits[:, start:end], hidden, weight, bias, start, end, dtype)
    logits.mul_(settings.logit_scale)
    if settings.final_logit_softcapping is not None:
        logits.div_(settings.final_logit_softcapping).tanh_().mul_(settings.final_logit_softcapping)
    logits.mul_(1 / settings.temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


@torch.no_grad()
def token_probability_square_sums(
    hidden: torch.Tensor,
    causal_lm: torch.nn.Module,
    settings: FusedHeadSettings,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """`sum_v p_v^2` of `causal_lm`'s tempered distribution at each position, no gradient.

    The full-vocabulary term of the logit-gradient norm `||e_y - p||_2` of VIMPO's adaptive actor coefficient
    ([`gnivo_trl.losses.logit_gradient_norm_factors`][gnivo_trl.losses.logit_gradient_norm_factors]). Computed as
    `exp(logsumexp(2 log p))` in float32 on chunks of `chunk_size` tokens, from the log-softmax the candidate-set KL
    uses (the exact KL kernel's projection and TRL's logit transform: scale, soft-cap, temperature); each chunk holds
    two float32 `(chunk_size, V)` buffers. The head is gathered (ZeRO-3) once around the whole loop, so every rank
    issues the same collectives however many tokens it holds (none included).

    Args:
        hidden: `(N, H)` final hidden states that predict `N` tokens (detached here).
        causal_lm: the model whose output embedding is the head.
        settings: its `fused_head_settings`.
        chunk_size: tokens per chunk.

    Returns:
        float32 `(N,)`, in `[1 / V, 1]`.
    """
    weight, bias = _head_parameters(causal_lm)
    hidden, precision = _head_context(settings, hidden.detach())
    sums = torch.zeros(hidden.size(0), device=hidden.device, dtype=torch.float32)
    with precision, maybe_gather_lm_head_ctx(weight, bias):
        for start in range(0, hidden.size(0), chunk_size):
            log_probs = _log_probs(hidden[start : start + chunk_size], weight, bias, settings)
            sums[start : start + chunk_size] = torch.logsumexp(log_probs.mul_(2.0), dim=-1).exp_()
    return sums


@torch.no_grad()
def candidate_set_token_kl(
    policy_hidden: torch.Tensor,
    policy_lm: torch.nn.Module,
    policy_settings: FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_lm: torch.nn.Module,
    ref_settings: FusedHeadSettings,
    topk: int,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The official candidate-set approximation of per-token `KL(pi_theta || pi_ref)`, no gradient.

    Per token, [`gnivo_trl.losses.candidate_set_kl_from_log_probs`][gnivo_trl.losses.candidate_set_kl_from_log_probs]:
    `sum_{v in C} p(v) (log p(v) - log q(v))` over the `topk` tokens `C` of largest policy probability, `p` and `q`
    normalised over the full vocabulary at the sampling temperature (both heads' logits transformed as TRL's fused head
    does). Computed on chunks of `chunk_size` tokens; each chunk holds three float32 `(chunk_size, V)` buffers (the two
    models' log-probabilities and a logsumexp temporary). The logits are projected as the exact KL's kernel projects
    them, so that over the whole vocabulary (`topk >= V`) this is `exact_token_kl` to float32 rounding.
    Both heads are gathered (ZeRO-3) once around the whole loop, so every rank issues the same collectives however
    many tokens it holds.

    Args:
        policy_hidden, ref_hidden: `(N, H)` final hidden states of each model that predict the same `N` tokens.
        policy_lm, ref_lm: the models whose output embeddings are the heads (the same model for a PEFT reference).
        policy_settings, ref_settings: their `fused_head_settings`.
        topk: candidate-set size (`vimpo_candidate_kl_topk`); the whole vocabulary when larger.
        chunk_size: tokens per chunk.

    Returns:
        float32 `(N,)`, in nats (a truncated sum: can be slightly negative).
    """

    def chunk_kl(policy_chunk, policy_head, ref_chunk, ref_head) -> torch.Tensor:
        policy_log_probs = _log_probs(policy_chunk, *policy_head, policy_settings)
        ref_log_probs = _log_probs(ref_chunk, *ref_head, ref_settings)
        return candidate_set_kl_from_log_probs(policy_log_probs, ref_log_probs, topk)

    return _per_chunk_with_gathered_heads(
        policy_hidden, policy_lm, policy_settings, ref_hidden, ref_lm, ref_settings, chunk_size, chunk_kl
    )
