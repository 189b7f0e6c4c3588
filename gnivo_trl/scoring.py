"""Per-token scores of completion tokens on TRL's own kernels: log-probabilities, entropy and the exact KL.

VIMPO needs, at every completion position, the sampled token's log-probability under the policy (with gradient) and
under the frozen reference, and the exact full-vocabulary `KL(pi_theta || pi_ref)`. None of these may materialise
`(B, T, V)` logits. TRL 1.16 ships what computes them, in vocabulary tiles:

* the fused LM head that `GRPOTrainer` installs on the policy and the reference (`add_fused_lm_head`): a
  forward that returns the sampled tokens' log-probabilities (and, on request, the entropy and `log sum_v p_v^2`)
  instead of logits, together with the MoE router's load-balancing loss. `fused_forward_scores` calls that
  forward exactly as `GRPOTrainer` does, and reads the backbone's final hidden states on the way (a forward hook
  on the backbone the fused head runs), because the KL kernel needs them;
* `trl.kernels.chunked_divergence.ChunkedDivergenceFunction`, the kernel of TRL's `DistillationTrainer`: with
  `beta=1.0` the reverse KL `KL(student || teacher)`, here `KL(pi_theta || pi_ref)` with the policy as student.
  `exact_token_kl` feeds it both models' hidden states and heads as `DistillationTrainer` does.

The official code's candidate-set KL (a top-k over the whole vocabulary) has no TRL kernel: it is computed here in
chunks of tokens from both heads' full logits, projected and transformed exactly as the divergence kernel does.

The logit transform (scale, soft-cap, temperature, float32 head) of each model is the one TRL's `add_fused_lm_head`
installed on it, read off the forward it patched (`fused_head_settings`) rather than re-derived from a list of
config attribute names that would drift from TRL's. Heads are passed as `LMHead` tensors, read by the caller
in the context that selects them (a PEFT reference's head is read with the adapter disabled), and gathered under
DeepSpeed ZeRO-3 once per call by every rank, never once per chunk.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._trl_private import SUPPORTED_TRL, trl_private
from .losses import candidate_set_kl_from_log_probs

__all__ = [
    "FusedForwardScores",
    "FusedHeadSettings",
    "LMHead",
    "candidate_set_token_kl",
    "check_heads_on_one_device",
    "exact_token_kl",
    "fused_forward_scores",
    "fused_head_settings",
    "has_fused_head",
    "output_head",
]

_FUSED_HEAD_FREE_VARIABLES = (
    "temperature",
    "logit_scale",
    "final_logit_softcapping",
    "cast_lm_head_to_fp32",
    "backbone_attr",
)


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


def _forward_chain(model: torch.nn.Module):
    """`model.forward` and every function it wraps (`__wrapped__`: accelerate's mixed-precision wrapper,
    `torch.autocast` and `functools.wraps` decorators), outermost first, as plain functions."""
    function = model.forward
    seen = set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        function = getattr(function, "__func__", function)
        yield function
        function = getattr(function, "__wrapped__", None)


def _fused_forward(model: torch.nn.Module):
    """TRL's fused forward in `model`'s forward chain, or None."""
    for function in _forward_chain(model):
        names = getattr(getattr(function, "__code__", None), "co_freevars", ())
        if all(name in names for name in _FUSED_HEAD_FREE_VARIABLES):
            return function
    return None


def has_fused_head(model: torch.nn.Module) -> bool:
    """Whether TRL's `add_fused_lm_head` patched `model` (anywhere in its forward chain: accelerate and autocast
    wrap the patched forward under mixed precision)."""
    return _fused_forward(model) is not None


def fused_head_settings(causal_lm: torch.nn.Module) -> FusedHeadSettings:
    """The settings TRL's `add_fused_lm_head` installed on `causal_lm` (read off the forward it patched).

    `GRPOTrainer` adds the fused head to the policy (the base model under PEFT) and to the reference model at
    construction; the values it derived from the model's config live in that forward's closure. Reading them there
    keeps every model family TRL supports (and future ones) exactly as TRL treats them. The forward may be wrapped
    (accelerate wraps it in autocast and an fp32 output cast under `bf16`/`fp16`): the chain of `__wrapped__`
    functions is followed down to TRL's.

    Raises:
        RuntimeError: if no function in `causal_lm.forward`'s chain is TRL's fused forward.
    """
    forward = _fused_forward(causal_lm)
    if forward is None:
        import trl

        raise RuntimeError(
            f"{type(causal_lm).__name__}.forward is not TRL's fused LM-head forward (trl.trainer.utils."
            "add_fused_lm_head), which GRPOTrainer installs on the policy and the reference at construction, and no "
            "function it wraps (through __wrapped__) is either. Score with models prepared by the trainer, or call "
            "add_fused_lm_head(model, temperature, ...) first. If the model does carry TRL's head, a wrapper that "
            "hides the function it wraps (no __wrapped__) or a change of the fused head in TRL "
            f"{trl.__version__} (gnivo-trl is tested with trl{SUPPORTED_TRL}) is the likely cause."
        )
    values = inspect.getclosurevars(forward).nonlocals
    return FusedHeadSettings(*(values[name] for name in _FUSED_HEAD_FREE_VARIABLES))


class LMHead(NamedTuple):
    """One model's output projection: `weight` `(V, H)` and `bias` `(V,)` or None (ZeRO-3 shards allowed)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def output_head(causal_lm: torch.nn.Module) -> LMHead:
    """`causal_lm`'s output embedding, read now: under PEFT with `modules_to_save=["lm_head"]` the head is the
    trainable copy while the adapter is enabled and the original inside `disable_adapter()` (read the reference's
    head there)."""
    head = causal_lm.get_output_embeddings()
    return LMHead(head.weight, head.bias)


def check_heads_on_one_device(policy_head: LMHead, ref_head: LMHead) -> None:
    """Refuse heads on different devices (a `device_map` that put them apart): the KL kernels project both heads'
    logits tile by tile side by side, on one device."""
    if policy_head.weight.device != ref_head.weight.device:
        raise ValueError(
            f"The policy's LM head is on {policy_head.weight.device} and the reference's on "
            f"{ref_head.weight.device}. VIMPO's KL to the reference projects both heads side by side, so they must "
            "be on one device: load the policy and the reference with a device_map that puts both output "
            "embeddings on the same device (e.g. model_init_kwargs={'device_map': {'': 0}} for a model that fits "
            "one device), or train on one device per process (accelerate launch) instead of a split model."
        )


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
    settings: FusedHeadSettings,
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


def _projection_precision(settings: FusedHeadSettings, hidden: torch.Tensor):
    """The precision TRL's fused head projects in: float32 outside autocast with `cast_lm_head_to_fp32`."""
    if settings.cast_lm_head_to_fp32:
        return hidden.float(), torch.autocast(hidden.device.type, enabled=False)
    return hidden, contextlib.nullcontext()


def _per_chunk_with_gathered_heads(
    policy_hidden: torch.Tensor,
    policy_head: LMHead,
    policy_settings: FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_head: LMHead,
    ref_settings: FusedHeadSettings,
    chunk_size: int,
    chunk_kl: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """`chunk_kl(policy_chunk, policy_head, ref_chunk, ref_head) -> (n,)` over chunks of `chunk_size` tokens,
    float32 `(N,)` on the heads' device. Both heads are gathered (ZeRO-3) once around the whole loop, so every rank
    issues the same collectives however many tokens it holds; the hidden states move to the heads' device (the
    backbone of a split model can end elsewhere, as TRL's fused head allows) in the precision TRL's fused head
    projects in (float32 outside autocast with `cast_lm_head_to_fp32`)."""
    check_heads_on_one_device(policy_head, ref_head)
    device = policy_head.weight.device
    policy_hidden, precision = _projection_precision(policy_settings, policy_hidden.to(device))
    ref_hidden, _ = _projection_precision(ref_settings, ref_hidden.to(device))
    kl = torch.zeros(policy_hidden.size(0), device=device, dtype=torch.float32)
    maybe_gather_lm_head_ctx = trl_private("trl.trainer.utils", "maybe_gather_lm_head_ctx")
    with precision, maybe_gather_lm_head_ctx(*policy_head), maybe_gather_lm_head_ctx(*ref_head):
        for start in range(0, policy_hidden.size(0), chunk_size):
            stop = start + chunk_size
            kl[start:stop] = chunk_kl(policy_hidden[start:stop], policy_head, ref_hidden[start:stop], ref_head)
    return kl


@torch.no_grad()
def exact_token_kl(
    policy_hidden: torch.Tensor,
    policy_head: LMHead,
    policy_settings: FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_head: LMHead,
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
        policy_head, ref_head: the models' output projections (`output_head`), on one device.
        policy_settings, ref_settings: their `fused_head_settings`.
        chunk_size: tokens per kernel call.

    Returns:
        float32 `(N,)`, in nats.
    """
    divergence = trl_private("trl.kernels.chunked_divergence", "ChunkedDivergenceFunction")

    def chunk_kl(policy_chunk, policy_head, ref_chunk, ref_head) -> torch.Tensor:
        kl, _ = divergence.apply(
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


def _log_probs(hidden: torch.Tensor, head: LMHead, settings: FusedHeadSettings) -> torch.Tensor:
    """Float32 `(n, V)` log-softmax of one head, with the numerics of the exact KL's kernel: TRL's
    `ChunkedDivergenceFunction` projection (hidden states and head rounded to the compute dtype, float32 logits,
    its vocabulary tiles), then its logit transform in float32 (`* logit_scale`, soft-cap `cap * tanh(z / cap)`,
    `* (1 / temperature)`), in place on one buffer."""
    module = "trl.kernels.chunked_divergence"
    compute_dtype, project = trl_private(module, "_compute_dtype"), trl_private(module, "_project")
    vocab_chunk_size = trl_private(module, "VOCAB_CHUNK_SIZE")
    dtype = compute_dtype(hidden)
    hidden = hidden.to(dtype)
    vocab = head.weight.size(0)
    logits = torch.empty((hidden.size(0), vocab), device=hidden.device, dtype=torch.float32)
    for start in range(0, vocab, vocab_chunk_size):
        end = min(start + vocab_chunk_size, vocab)
        project(logits[:, start:end], hidden, head.weight, head.bias, start, end, dtype)
    logits.mul_(settings.logit_scale)
    if settings.final_logit_softcapping is not None:
        logits.div_(settings.final_logit_softcapping).tanh_().mul_(settings.final_logit_softcapping)
    logits.mul_(1 / settings.temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


@torch.no_grad()
def candidate_set_token_kl(
    policy_hidden: torch.Tensor,
    policy_head: LMHead,
    policy_settings: FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_head: LMHead,
    ref_settings: FusedHeadSettings,
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
