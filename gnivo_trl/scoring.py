"""Per-token scores of VIMPO's completion tokens: one pass of each model's LM head, in float32.

VIMPO needs, at every valid completion position, the sampled token's log-probability under the policy (with
gradient) and under the frozen reference, the exact full-vocabulary `KL(pi_theta || pi_ref)` (or the official
candidate-set approximation), the policy's entropy and, for `vimpo_adaptive_actor_coeff`, `sum_v p_v^2`. None of
these may materialise `(B, T, V)` logits, and `rho = log pi_theta - log pi_ref` must come from the same float32
logits as the KL: VIMPO sums `rho` over whole completions, so logit rounding would add up in its value residual.

`policy_reference_scores` computes all of them in one tiled pass (`_PolicyReferenceHead`): per tile of tokens and
vocabulary it projects the policy's head and the reference's head once each, with float32 output, from the stored
hidden states and weights (never rounded to the autocast dtype), applies each model's logit transform and folds both
tiles into online-logsumexp statistics. Its backward recomputes the policy's tile once and forms the two gradient
GEMMs; the KL, the reference and the entropy are detached (VIMPO's `kappa` is stop-gradient), so nothing of the
reference is recomputed and no `(tokens, vocabulary)` tensor is stored. Per completion token: 5 LM-head projections
per training step (policy and reference tile forward, policy tile in the backward, gradient of the hidden states,
gradient of the weight), as GRPO with a reference model.

The hidden states come from each model's backbone run through the model's own wrapper (`call_through`, TRL's
`_ForwardRedirection`, as `DistillationTrainer` runs its student and teacher backbones), so DDP, DeepSpeed (ZeRO-3
parameter gathering and gradient reduction) and PEFT (LoRA layers, a disabled adapter) act as in a plain forward;
`completion_hidden_states` returns the MoE router's load-balancing loss computed by the model's own
`load_balancing_loss_func`, as the model's forward computes it.

Reused from TRL 1.16 (non-public names through `gnivo_trl._trl_private.trl_private`):

* the logit transform (temperature, logit scale, soft-cap) and the backbone attribute that `add_fused_lm_head`
  installed on each model, read off the forward it patched (`fused_head_settings`);
* `trl.kernels.chunked_divergence`: `_project` (a tile of `hidden @ weight.T` with float32 output: bf16 inputs with
  float32 accumulation on CUDA, float32 elsewhere) and the forward fold `_stats_kernel` (Triton) / `_stats_tile`
  (torch), which gives both models' log-normalisers, the policy's entropy and the reverse-KL cross term;
* `trl.kernels.chunked_logprob`: `_forward_kernel` / `_forward_tile` for `sum_v p_v^2`, `_backward_kernel` /
  `_backward_tile` for the gradient of the sampled token's log-probability with respect to the logits,
  `_addmm_fp32` for the gradient GEMMs, `_torch_transform`, and `_use_triton` (Triton where TRL uses it);
* `trl.trainer.utils.maybe_gather_lm_head_ctx` (ZeRO-3: both heads gathered once per pass, by every rank whatever its
  token count) and `trl.models.utils._ForwardRedirection`.

Not reusable as a whole, and why:

* `ChunkedLogProbFunction` (the fused head's kernel) projects one model: the policy's log-probs from it and the KL
  from another kernel re-project the policy's tile, which is what this module removes (7 projections per token
  before, 5 now). It projects in the autocast dtype (bf16 tiles under bf16 autocast), so its `rho` would not be the
  KL's float32 `rho`.
* `ChunkedDivergenceFunction` folds both models' tiles but returns no sampled-token log-probabilities, projects in
  the autocast dtype, and its backward is the gradient of the divergence (both tiles recomputed), which VIMPO does not
  use.
* `add_fused_lm_head`'s forward returns no hidden states, and on devices without Triton it projects every position,
  prompt included; here only the valid completion tokens are projected, on every device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._trl_private import SUPPORTED_TRL, trl_private
from .losses import candidate_set_kl_from_log_probs

__all__ = [
    "CompletionHiddenStates",
    "FusedHeadSettings",
    "LMHead",
    "PolicyReferenceScores",
    "call_through",
    "check_heads_on_one_device",
    "completion_hidden_states",
    "fused_head_settings",
    "has_fused_head",
    "output_head",
    "policy_reference_scores",
]

# TRL's vocabulary tile (`trl.kernels.chunked_divergence.VOCAB_CHUNK_SIZE`, the same value, not imported: that module
# exports no names).
VOCAB_TILE = 32768
# TRL's kernel modules, whose pieces are read through `trl_private` where used.
_DIVERGENCE = "trl.kernels.chunked_divergence"
_LOGPROB = "trl.kernels.chunked_logprob"

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


# --------------------------------------------------------------------------------------------------------------------
# Hidden states: each model's backbone, run through the model's own wrapper
# --------------------------------------------------------------------------------------------------------------------


def call_through(wrapper: torch.nn.Module, inner: torch.nn.Module, function: Callable[..., Any], **kwargs) -> Any:
    """`function(**kwargs)`, run as the forward of `inner` called through `wrapper` (TRL's `_ForwardRedirection`).

    `wrapper` is what the trainer calls (a DDP module, a DeepSpeed engine, a compiled module, or `inner` itself) and
    `inner` the module it wraps (`accelerator.unwrap_model(wrapper)`). DDP then prepares its gradient reduction and
    DeepSpeed arms its ZeRO-3 hooks as for a forward of the model, while `function` runs the backbone and the head
    directly. Only `kwargs` pass through the wrapper (which may move or cast them): give it the token ids and the
    attention mask, and bind everything else in `function`.
    """
    redirect = trl_private("trl.models.utils", "_ForwardRedirection")()
    return redirect(wrapper, inner, function, **kwargs)


class CompletionHiddenStates(NamedTuple):
    """A backbone's final hidden states at the positions that predict the valid completion tokens.

    Attributes:
        hidden: `(N, H)` in the backbone's output dtype, row-major order of the valid tokens; differentiable when the
            backbone ran with gradient.
        aux_loss: the MoE router's load-balancing loss (0-d), or None unless requested.
    """

    hidden: torch.Tensor
    aux_loss: torch.Tensor | None


def _load_balancing_loss(causal_lm: torch.nn.Module, router_logits, attention_mask: torch.Tensor) -> torch.Tensor:
    """The MoE load-balancing loss exactly as `causal_lm`'s own forward computes it: its modeling module's
    `load_balancing_loss_func` with the expert counts the model read from its config."""
    module = inspect.getmodule(type(causal_lm))
    function = getattr(module, "load_balancing_loss_func", None)
    num_experts = getattr(causal_lm, "num_experts", None)
    top_k = getattr(causal_lm, "num_experts_per_tok", None)
    if function is None or num_experts is None or top_k is None:
        raise ValueError(
            f"{type(causal_lm).__name__} returned router logits, but its modeling module has no "
            "load_balancing_loss_func or the model has no num_experts / num_experts_per_tok, so VIMPO cannot add the "
            "router's load-balancing loss as its forward does. Set router_aux_loss_coef=0.0 to train without it."
        )
    return function(router_logits, num_experts, top_k, attention_mask)


def completion_hidden_states(
    causal_lm: torch.nn.Module,
    settings: FusedHeadSettings,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    valid: torch.Tensor,
    output_router_logits: bool = False,
) -> CompletionHiddenStates:
    """Run the backbone of `causal_lm` once on prompt + completion, without its LM head.

    The backbone is the module TRL's fused head runs (`settings.backbone_attr`, `base_model` for causal LMs), called
    with `use_cache=False` as TRL calls it; under PEFT pass the base model (`get_base_model()`): its LoRA layers, and
    a disabled adapter, act as in the adapter's own forward. Runs with or without gradient as the caller's mode is, and
    under the caller's autocast. Call it through the model's wrapper (`call_through`) when there is one.

    Args:
        causal_lm: the causal LM (under PEFT the base model).
        settings: `fused_head_settings` of `causal_lm`.
        input_ids: `(B, L)` prompt + completion ids; the completion is the last `C = valid.size(1)` positions.
        attention_mask: `(B, L)`.
        valid: `(B, C)` bool, the completion tokens to score.
        output_router_logits: also return the MoE router's load-balancing loss (`_load_balancing_loss`).
    """
    num_completion = valid.size(1)
    kwargs = {"output_router_logits": True} if output_router_logits else {}
    backbone = getattr(causal_lm, settings.backbone_attr)
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    last = outputs.last_hidden_state
    hidden = last[:, -num_completion - 1 : -1][valid.to(last.device)]
    aux_loss = _load_balancing_loss(causal_lm, outputs.router_logits, attention_mask) if output_router_logits else None
    return CompletionHiddenStates(hidden, aux_loss)


# --------------------------------------------------------------------------------------------------------------------
# Both heads in one tiled pass
# --------------------------------------------------------------------------------------------------------------------


class PolicyReferenceScores(NamedTuple):
    """Per-token scores of `N` tokens from one pass of the policy's and the reference's LM heads, float32 `(N,)`.

    All come from the same float32 logits of each model, transformed as TRL's fused head transforms them (logit
    scale, soft-cap, temperature).

    Attributes:
        log_probs: log pi_theta of the target tokens; the only differentiable output (to the policy's hidden states
            and head).
        ref_log_probs: log pi_ref of the target tokens, no gradient.
        entropy: entropy of pi_theta, nats, no gradient.
        kl: exact `KL(pi_theta || pi_ref)` over the full vocabulary, nats, no gradient.
        candidate_kl: the official candidate-set KL over the `candidate_topk` tokens of largest policy probability
            (`gnivo_trl.losses.candidate_set_kl_from_log_probs`), or None when not requested; no gradient.
        probability_square_sums: `sum_v p_v^2` of pi_theta, or None when not requested; no gradient.
    """

    log_probs: torch.Tensor
    ref_log_probs: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    candidate_kl: torch.Tensor | None
    probability_square_sums: torch.Tensor | None


def _stored_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a head projects in: that of the stored hidden states and weight (the wider of the two), never the
    autocast dtype. The tile itself is float32 (`_project`), so the logits carry no rounding beyond the inputs'."""
    return torch.promote_types(hidden.dtype, weight.dtype)


def _transform_args(settings: FusedHeadSettings) -> dict[str, Any]:
    """The logit transform of one model in the keyword form of TRL's `chunked_logprob` kernels."""
    softcap = settings.final_logit_softcapping
    return {
        "logit_scale": settings.logit_scale,
        "softcap": softcap or 1.0,
        "inv_t": 1 / settings.temperature,
        "HAS_SOFTCAP": softcap is not None,
    }


def _transform(raw: torch.Tensor, args: dict[str, Any]) -> torch.Tensor:
    """The tempered logits of raw float32 head outputs (TRL's `_torch_transform`, a new tensor)."""
    transform = trl_private(_LOGPROB, "_torch_transform")
    return transform(raw, args["logit_scale"], args["softcap"], args["inv_t"], args["HAS_SOFTCAP"])


class _PolicyReferenceHead(torch.autograd.Function):
    """`policy_reference_scores`'s kernel; see the module docstring. Inputs: `(N, H)` hidden states and `(V, H)` heads
    of both models (gathered here under ZeRO-3), `(N,)` target ids; outputs in `PolicyReferenceScores` order."""

    @staticmethod
    def forward(
        ctx,
        policy_hidden: torch.Tensor,
        policy_weight: torch.Tensor,
        policy_bias: torch.Tensor | None,
        ref_hidden: torch.Tensor,
        ref_weight: torch.Tensor,
        ref_bias: torch.Tensor | None,
        targets: torch.Tensor,
        policy_args: dict[str, Any],
        ref_args: dict[str, Any],
        candidate_topk: int | None,
        with_square_sums: bool,
        chunk_size: int,
        vocab_tile: int,
    ):
        ctx.set_materialize_grads(False)
        project = trl_private(_DIVERGENCE, "_project")
        use_triton = trl_private(_LOGPROB, "_use_triton")(policy_hidden.device)
        block = trl_private(_LOGPROB, "_BLOCK_SIZE")
        if use_triton:
            stats_fold, square_fold = (
                trl_private(_DIVERGENCE, "_stats_kernel"),
                trl_private(_LOGPROB, "_forward_kernel"),
            )
        else:
            stats_fold, square_fold = trl_private(_DIVERGENCE, "_stats_tile"), trl_private(_LOGPROB, "_forward_tile")
        maybe_gather_lm_head_ctx = trl_private("trl.trainer.utils", "maybe_gather_lm_head_ctx")
        device, num_tokens = policy_hidden.device, policy_hidden.size(0)
        policy_dtype = _stored_dtype(policy_hidden, policy_weight)
        ref_dtype = _stored_dtype(ref_hidden, ref_weight)
        stats_args = {
            "s_scale": policy_args["logit_scale"],
            "s_softcap": policy_args["softcap"],
            "t_scale": ref_args["logit_scale"],
            "t_softcap": ref_args["softcap"],
            "inv_t": policy_args["inv_t"],
            "S_HAS_SOFTCAP": policy_args["HAS_SOFTCAP"],
            "T_HAS_SOFTCAP": ref_args["HAS_SOFTCAP"],
        }

        def zeros() -> torch.Tensor:
            return torch.zeros(num_tokens, device=device, dtype=torch.float32)

        # Online-logsumexp statistics of both models (TRL's divergence fold), the target logits, and on request the
        # policy's sum of squared probabilities (TRL's log-prob fold, with its own running max) and candidate sets.
        p_max, q_max = zeros() - torch.inf, zeros() - torch.inf
        p_sum, p_x_sum, q_sum, q_gap, p_gap = zeros(), zeros(), zeros(), zeros(), zeros()
        p_target, q_target = zeros(), zeros()
        if with_square_sums:
            sq_max, sq_sum, sq_sq = zeros() - torch.inf, zeros(), zeros()
            unused, unused_max = zeros(), zeros() - torch.inf
        candidates = None
        rows = min(num_tokens, chunk_size)
        p_buf = torch.empty((rows, vocab_tile), device=device, dtype=torch.float32)
        q_buf = torch.empty((rows, vocab_tile), device=device, dtype=torch.float32)
        candidate_p, candidate_q = [], []
        with (
            torch.autocast(device.type, enabled=False),
            maybe_gather_lm_head_ctx(policy_weight, policy_bias, ref_weight, ref_bias),
        ):
            vocab = policy_weight.size(0)
            if ref_weight.size(0) != vocab:
                raise ValueError(
                    f"The policy's LM head has {vocab} rows and the reference's {ref_weight.size(0)}: VIMPO's KL "
                    "compares both distributions over one vocabulary, so use a reference with the policy's vocabulary."
                )
            for start in range(0, num_tokens, chunk_size):
                rows_here = slice(start, min(start + chunk_size, num_tokens))
                n = rows_here.stop - rows_here.start
                h_p = policy_hidden[rows_here].to(policy_dtype)
                h_q = ref_hidden[rows_here].to(ref_dtype)
                chunk_targets = targets[rows_here]
                chunk_p, chunk_q = None, None
                for column in range(0, vocab, vocab_tile):
                    stop = min(column + vocab_tile, vocab)
                    width = stop - column
                    p_tile, q_tile = p_buf[:n, :width], q_buf[:n, :width]
                    project(p_tile, h_p, policy_weight, policy_bias, column, stop, policy_dtype)
                    project(q_tile, h_q, ref_weight, ref_bias, column, stop, ref_dtype)
                    stats = (p_max, p_sum, p_x_sum, q_max, q_sum, q_gap, p_gap)
                    (stats_fold[(n,)] if use_triton else stats_fold)(
                        p_tile,
                        p_tile.stride(0),
                        q_tile,
                        q_tile.stride(0),
                        *(buffer[rows_here] for buffer in stats),
                        width,
                        BLOCK_SIZE=block,
                        **stats_args,
                    )
                    # The sampled tokens' logits: a gather of n values per tile, transformed as the fold does.
                    local = chunk_targets - column
                    in_tile = (local >= 0) & (local < width)
                    index = local.clamp(0, width - 1).unsqueeze(-1)
                    for tile, args, target in ((p_tile, policy_args, p_target), (q_tile, ref_args, q_target)):
                        picked = _transform(tile.gather(-1, index).squeeze(-1), args)
                        target[rows_here] = torch.where(in_tile, picked, target[rows_here])
                    if with_square_sums:
                        (square_fold[(n,)] if use_triton else square_fold)(
                            p_tile,
                            p_tile.stride(0),
                            chunk_targets,
                            sq_max[rows_here],
                            sq_sum[rows_here],
                            unused[rows_here],
                            sq_sq[rows_here],
                            unused[rows_here],
                            unused_max[rows_here],
                            unused[rows_here],
                            column,
                            width,
                            HAS_ENTROPY=False,
                            HAS_LOG_SUM_SQ_PROBS=True,
                            HAS_MEAN_LOGITS=False,
                            HAS_IS_TOP1=False,
                            BLOCK_SIZE=block,
                            **policy_args,
                        )
                    if candidate_topk is not None:
                        chunk_p, chunk_q = _merge_candidates(
                            chunk_p, chunk_q, p_tile, q_tile, candidate_topk, policy_args
                        )
                if candidate_topk is not None:
                    candidate_p.append(chunk_p)
                    candidate_q.append(chunk_q)

        p_log_z = p_max + torch.log(p_sum)
        q_log_z = q_max + torch.log(q_sum)
        log_probs = p_target - p_log_z
        ref_log_probs = q_target - q_log_z
        entropy = p_log_z - p_x_sum / p_sum
        kl = p_gap / p_sum - p_log_z + q_log_z
        square_sums = (sq_sq / sq_sum.square()) if with_square_sums else None
        if candidate_topk is not None:
            candidates = zeros()
            if num_tokens:
                raw_p, raw_q = torch.cat(candidate_p), torch.cat(candidate_q)
                candidates = candidate_set_kl_from_log_probs(
                    _transform(raw_p, policy_args) - p_log_z[:, None],
                    _transform(raw_q, ref_args) - q_log_z[:, None],
                    candidate_topk,
                )
        ctx.save_for_backward(policy_hidden, policy_weight, policy_bias, targets, p_log_z)
        ctx.policy_args, ctx.chunk_size, ctx.vocab_tile = policy_args, chunk_size, vocab_tile
        outputs = (ref_log_probs, entropy, kl, candidates, square_sums)
        ctx.mark_non_differentiable(*(output for output in outputs if output is not None))
        return (log_probs, *outputs)

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor | None, *_):  # type: ignore[override]
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        nothing = (None,) * 10
        if grad_log_probs is None:
            return (None, None, None, *nothing)
        project = trl_private(_DIVERGENCE, "_project")
        addmm_fp32 = trl_private(_LOGPROB, "_addmm_fp32")
        use_triton = trl_private(_LOGPROB, "_use_triton")(hidden.device)
        block = trl_private(_LOGPROB, "_BLOCK_SIZE")
        fold = trl_private(_LOGPROB, "_backward_kernel") if use_triton else trl_private(_LOGPROB, "_backward_tile")
        maybe_gather_lm_head_ctx = trl_private("trl.trainer.utils", "maybe_gather_lm_head_ctx")
        chunk_size, vocab_tile = ctx.chunk_size, ctx.vocab_tile
        dtype = _stored_dtype(hidden, weight)
        num_tokens = hidden.size(0)
        grad_log_probs = grad_log_probs.float().contiguous()
        grad_hidden = grad_weight = grad_bias = None
        with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            vocab = weight.size(0)
            # Accumulated in float32 whatever the inputs' dtype, as TRL's kernels do.
            if needs_hidden:
                grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
            if needs_weight:
                grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
            if needs_bias:
                grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32)
            buffer = torch.empty((min(num_tokens, chunk_size), vocab_tile), device=hidden.device, dtype=torch.float32)
            for start in range(0, num_tokens, chunk_size):
                rows = slice(start, min(start + chunk_size, num_tokens))
                n = rows.stop - rows.start
                h = hidden[rows].to(dtype)
                for column in range(0, vocab, vocab_tile):
                    stop = min(column + vocab_tile, vocab)
                    tile = buffer[:n, : stop - column]
                    project(tile, h, weight, bias, column, stop, dtype)  # the forward's tile, recomputed
                    # In place: d(log p_target) / d(raw logits) = (1[target] - p) * d(transform), times the gradient.
                    kernel = fold[(n, -(-(stop - column) // block))] if use_triton else fold
                    kernel(
                        tile,
                        tile.stride(0),
                        targets[rows],
                        log_z[rows],
                        log_z[rows],  # the entropy's slot: no entropy gradient
                        grad_log_probs[rows],
                        grad_log_probs[rows],  # idem
                        column,
                        stop - column,
                        HAS_LOGPROB_GRAD=True,
                        HAS_ENTROPY_GRAD=False,
                        BLOCK_SIZE=block,
                        **ctx.policy_args,
                    )
                    grad_tile = tile.to(dtype)
                    if grad_hidden is not None:
                        addmm_fp32(grad_hidden[rows], grad_tile, weight[column:stop].to(dtype))
                    if grad_weight is not None:
                        addmm_fp32(grad_weight[column:stop], grad_tile.t(), h)
                    if grad_bias is not None:
                        grad_bias[column:stop] += tile.sum(dim=0, dtype=torch.float32)
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            *nothing,
        )


def _merge_candidates(chunk_p, chunk_q, p_tile, q_tile, topk: int, policy_args: dict[str, Any]):
    """The `topk` largest policy logits seen so far per token (raw, with the reference's at the same tokens): this
    tile's top tokens merged with the running set. Selecting by raw logit is selecting by tempered probability (the
    transform increases with the logit for a positive logit scale)."""
    order = p_tile if policy_args["logit_scale"] > 0 else _transform(p_tile, policy_args)
    index = torch.topk(order, k=min(topk, p_tile.size(-1)), dim=-1).indices
    tile_p, tile_q = p_tile.gather(-1, index), q_tile.gather(-1, index)
    if chunk_p is None:
        return tile_p, tile_q
    merged_p, merged_q = torch.cat([chunk_p, tile_p], dim=-1), torch.cat([chunk_q, tile_q], dim=-1)
    order = merged_p if policy_args["logit_scale"] > 0 else _transform(merged_p, policy_args)
    index = torch.topk(order, k=min(topk, merged_p.size(-1)), dim=-1).indices
    return merged_p.gather(-1, index), merged_q.gather(-1, index)


def policy_reference_scores(
    policy_hidden: torch.Tensor,
    policy_head: LMHead,
    policy_settings: FusedHeadSettings,
    ref_hidden: torch.Tensor,
    ref_head: LMHead,
    ref_settings: FusedHeadSettings,
    targets: torch.Tensor,
    *,
    candidate_topk: int | None = None,
    probability_square_sums: bool = False,
    chunk_size: int = 1024,
    vocab_tile: int = VOCAB_TILE,
) -> PolicyReferenceScores:
    """Both models' scores of `N` target tokens from one float32 pass of each LM head (see the module docstring).

    Per tile of `chunk_size` tokens and `vocab_tile` vocabulary entries, each head is projected once, with float32
    output, from the stored hidden states and weights whatever the autocast (bf16 weights give bf16 x bf16 products
    accumulated in float32; float32 weights a float32 GEMM); the backward recomputes the policy's tile once. Working
    memory: two float32 `(chunk_size, vocab_tile)` tiles (256 MiB at the defaults) plus the fold's temporaries on
    devices without Triton. Both heads are gathered (ZeRO-3) once per pass, and the policy's once more in the
    backward, by every rank whatever its token count (also 0). On CUDA with TF32 matrix products allowed
    (`torch.backends.cuda.matmul.allow_tf32`, `TrainingArguments(tf32=True)`) a float32 projection rounds its inputs
    to TF32's 10-bit mantissa: leave TF32 off for VIMPO.

    Args:
        policy_hidden, ref_hidden: `(N, H)` final hidden states of each model that predict the same `N` tokens (moved
            to the heads' device here); only `policy_hidden` may carry gradient.
        policy_head, ref_head: the models' output projections (`output_head`), on one device; the reference's gets no
            gradient.
        policy_settings, ref_settings: their `fused_head_settings` (the same temperature).
        targets: `(N,)` long token ids whose log-probabilities are returned.
        candidate_topk: also return the official candidate-set KL over this many tokens (the whole vocabulary when
            larger).
        probability_square_sums: also return the policy's `sum_v p_v^2` (for `vimpo_adaptive_actor_coeff`).
        chunk_size: tokens per tile (`vimpo_kl_chunk_size`).
        vocab_tile: vocabulary entries per tile (TRL's 32,768; smaller in tests).

    Returns:
        `PolicyReferenceScores`, float32 `(N,)` tensors on the heads' device.

    Raises:
        ValueError: the heads are on different devices, or the models were given different temperatures.
    """
    check_heads_on_one_device(policy_head, ref_head)
    if policy_settings.temperature != ref_settings.temperature:
        raise ValueError(
            f"The policy's fused head divides its logits by temperature {policy_settings.temperature} and the "
            f"reference's by {ref_settings.temperature}: the KL between them compares the distributions at one "
            "sampling temperature, so prepare both models with the temperature the completions were sampled at."
        )
    device = policy_head.weight.device
    outputs = _PolicyReferenceHead.apply(
        policy_hidden.to(device),
        *policy_head,
        ref_hidden.to(device).detach(),
        *ref_head,  # the parameters themselves (ZeRO-3 gathers them); the kernel returns them no gradient
        targets.to(device),
        _transform_args(policy_settings),
        _transform_args(ref_settings),
        candidate_topk,
        probability_square_sums,
        chunk_size,
        vocab_tile,
    )
    return PolicyReferenceScores(*outputs)
