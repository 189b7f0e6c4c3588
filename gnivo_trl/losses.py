"""Loss mathematics of GN-IVO and VIMPO as pure tensor functions.

This module imports nothing from TRL: the functions take plain tensors so that other RL stacks (verl, OpenRLHF,
hand-written loops) can call them, and so that tests can compare them with naive loop implementations.
``../shared/SPEC.md`` (sections 3 and 4) is the normative definition of what they compute.

Conventions shared by every function:

* A batch holds ``B = n_groups * K`` completions with ``K = num_generations``; the rows of group ``g`` are
  ``[g*K, (g+1)*K)``.
* Per-token tensors are ``(B, T)``: ``T`` is the padded completion length, ``mask`` is 1 on completion tokens that
  take part in the loss (including EOS) and 0 elsewhere.
* Log-probabilities are natural logarithms (nats). Every sum, cumulative sum and softmax runs in float32 whatever the
  input dtype: a bf16 cumulative sum over thousands of tokens is wrong by whole nats.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "GroupWeights",
    "PrefixLogRatios",
    "gnivo_linearized_row_loss",
    "gnivo_loss",
    "gnivo_group_losses",
    "group_weights",
    "prefix_log_ratios",
    "unit_boundaries",
]

WeightNormalization = Literal["softmax", "none"]

# exp(x) overflows float32 above this: log(torch.finfo(torch.float32).max) = 88.72...
_FLOAT32_EXP_LIMIT = math.log(torch.finfo(torch.float32).max)
# Stands in for the log-ratio of a row that is not a group member (NaN reward, masked importance ratio): finite so
# that softmax and its backward never see NaN, low enough that exp() of it is exactly 0.
_EXCLUDED_LOGIT = -1.0e30


# ----------------------------------------------------------------------------------------------------------------------
# GN-IVO
# ----------------------------------------------------------------------------------------------------------------------


class PrefixLogRatios(NamedTuple):
    """Prefix log-ratios of each row, indexed by unit (not by token position).

    Attributes:
        values: ``(B, U)`` float32, ``values[i, t-1] = S_i(t)``, the summed masked log-ratio of the first ``t`` units
            of row ``i``; held at ``S_i(n_i)`` for ``t > n_i`` (a finished completion stays in its terminal state).
            ``U`` is the largest unit count in the batch (at least 1). Differentiable through ``logp``.
        num_units: ``(B,)`` int64, ``n_i``, the number of units (boundaries) of each row; 0 for a fully masked row.
    """

    values: torch.Tensor
    num_units: torch.Tensor


def unit_boundaries(mask: torch.Tensor, boundaries: torch.Tensor | None = None) -> torch.Tensor:
    """Positions that close a prefix unit, as a ``(B, T)`` bool tensor.

    ``boundaries`` (optional ``(B, T)`` bool) marks candidate unit ends; ``None`` means every unmasked token (the
    ``token`` unit). Masked positions never close a unit, and the last unmasked token of every row always does.
    """
    valid = mask.bool()
    closes = valid.clone() if boundaries is None else boundaries.bool() & valid
    T = mask.size(1)
    positions = torch.arange(T, device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(dim=1)  # -1 for a fully masked row
    has_tokens = last >= 0
    rows = torch.nonzero(has_tokens, as_tuple=True)[0]
    closes[rows, last[rows]] = True
    return closes


def prefix_log_ratios(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    boundaries: torch.Tensor | None = None,
) -> PrefixLogRatios:
    """Per-unit prefix sums ``S_i(t)`` of the masked log-ratio ``logp - old_logp`` (SPEC section 3).

    Args:
        logp: ``(B, T)`` log pi_theta of the sampled tokens (any float dtype; differentiable).
        old_logp: ``(B, T)`` log pi_old of the same tokens (treated as a constant).
        mask: ``(B, T)`` 0/1 loss mask.
        boundaries: optional ``(B, T)`` bool marking positions that close a unit; ``None`` = every unmasked token.

    Returns:
        :class:`PrefixLogRatios` with float32 values of shape ``(B, U)``.
    """
    valid = mask.bool()
    # where() rather than a product: log-probs at padded positions may be -inf or garbage.
    token_log_ratio = torch.where(valid, logp.float() - old_logp.detach().float(), 0.0)
    cumulative = token_log_ratio.cumsum(dim=1)  # float32, (B, T)

    closes = unit_boundaries(mask, boundaries)
    num_units = closes.sum(dim=1)
    U = max(int(num_units.max().item()) if num_units.numel() else 1, 1)
    T = mask.size(1)
    positions = torch.arange(T, device=mask.device).expand_as(closes)
    last = torch.where(closes, positions, 0).amax(dim=1)
    # unit_position[i, t] = token position closing unit t of row i; positions past n_i hold the last boundary, which
    # realises the "finished completion stays in its terminal state" rule with a single gather.
    unit_position = last[:, None].expand(-1, U + 1).clone()
    unit_rank = torch.where(closes, closes.long().cumsum(dim=1) - 1, U)  # non-boundaries go to a spill column
    unit_position.scatter_(1, unit_rank, positions.expand_as(closes).clone().masked_fill(~closes, 0))
    unit_position = unit_position[:, :U]
    # Rows without any unit gather position 0, whose cumulative log-ratio is 0 because the mask is 0 there.
    values = cumulative.gather(1, unit_position)
    return PrefixLogRatios(values=values, num_units=num_units)


class GroupWeights(NamedTuple):
    """Target weights of each row inside its group (all detached, float32, shape ``(B,)``).

    Attributes:
        weights: ``w_i`` (0 for rows that are not group members).
        member: bool, whether the row takes part in its group (finite reward and non-zero importance ratio).
        weight_sum: ``sum_j w_j`` over the row's group, broadcast to every row of the group.
        group_size: number of members of the row's group, broadcast to every row of the group.
    """

    weights: torch.Tensor
    member: torch.Tensor
    weight_sum: torch.Tensor
    group_size: torch.Tensor


def group_weights(
    rewards: torch.Tensor,
    num_generations: int,
    alpha: float,
    weight_normalization: WeightNormalization = "softmax",
    importance_ratio: torch.Tensor | None = None,
) -> GroupWeights:
    """GN-IVO target weights ``w_i`` per row (SPEC section 3).

    Args:
        rewards: ``(B,)`` scalar rewards; NaN marks a row without a reward (it leaves its group: weight 0, no
            gradient, and it does not count in the group softmax).
        num_generations: ``K``; ``B`` must be a multiple of it and groups are consecutive rows.
        alpha: reward temperature, > 0.
        weight_normalization: ``"softmax"`` gives ``w = softmax_{i in g}(R_i / alpha)`` over the group's members;
            ``"none"`` gives the paper's Eq. 9 weights ``exp(R_i / alpha) / K_g`` with ``K_g`` the number of members.
        importance_ratio: optional ``(B,)`` sequence-level importance ratio pi_old / pi_sampler (vLLM correction).
            It multiplies each member's weight (self-normalised importance weighting of the target distribution);
            a ratio of 0 (a masked sample) removes the row from its group like a NaN reward.

    Returns:
        :class:`GroupWeights`, all float32 and detached.

    Raises:
        ValueError: if ``alpha <= 0``, ``B`` is not a multiple of ``K``, or ``weight_normalization="none"`` and some
            ``R / alpha`` overflows float32.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    if weight_normalization not in ("softmax", "none"):
        raise ValueError(f"weight_normalization must be 'softmax' or 'none', got {weight_normalization!r}.")
    B = rewards.numel()
    if num_generations < 1 or B % num_generations != 0:
        raise ValueError(f"The batch of {B} rows is not a whole number of groups of num_generations={num_generations}.")
    K = num_generations
    rewards = rewards.detach().float().reshape(-1, K)
    member = torch.isfinite(rewards)
    if importance_ratio is not None:
        ratio = importance_ratio.detach().float().reshape(-1, K)
        member = member & (ratio > 0)
    else:
        ratio = torch.ones_like(rewards)
    scaled = torch.where(member, rewards / alpha, 0.0)
    group_size = member.sum(dim=1, keepdim=True).float()
    if weight_normalization == "softmax":
        logits = torch.where(member, scaled, _EXCLUDED_LOGIT)
        weights = torch.softmax(logits, dim=1)
    else:
        if bool((scaled > _FLOAT32_EXP_LIMIT).any()):
            worst = float(scaled.max())
            raise ValueError(
                f"weight_normalization='none' needs exp(R / alpha) to fit in float32, but R / alpha reaches {worst:.4g} "
                f"(limit {_FLOAT32_EXP_LIMIT:.2f}). Use weight_normalization='softmax', a larger alpha, or rescale "
                "the rewards."
            )
        weights = torch.exp(scaled) / group_size.clamp(min=1.0)
    weights = torch.where(member, weights * ratio, 0.0)
    weight_sum = weights.sum(dim=1, keepdim=True).expand(-1, K)
    return GroupWeights(
        weights=weights.reshape(-1),
        member=member.reshape(-1),
        weight_sum=weight_sum.reshape(-1),
        group_size=group_size.expand(-1, K).reshape(-1),
    )


def gnivo_group_losses(
    prefix_values: torch.Tensor,
    num_units: torch.Tensor,
    weights: GroupWeights,
    num_generations: int,
) -> torch.Tensor:
    """Exact per-group GN-IVO loss ``L_g`` from prefix log-ratios of intact, consecutive groups.

    Args:
        prefix_values: ``(B, U)`` float32 ``S_i(t)`` (see :func:`prefix_log_ratios`); differentiable.
        num_units: ``(B,)`` unit counts ``n_i``.
        weights: the rows' :class:`GroupWeights`.
        num_generations: ``K``.

    Returns:
        ``(n_groups,)`` float32 ``L_g = (1/T_g) sum_{t <= T_g} -sum_i w_i log softmax_i(S(t))``, with ``T_g`` the
        largest unit count among the group's members. A group with no member or no unit gives 0.
    """
    K = num_generations
    U = prefix_values.size(1)
    member = weights.member.reshape(-1, K)
    S = prefix_values.float().reshape(-1, K, U)
    logits = torch.where(member[:, :, None], S, _EXCLUDED_LOGIT)
    log_q = torch.log_softmax(logits, dim=1)  # softmax over the group, per prefix index
    w = weights.weights.reshape(-1, K, 1)
    per_prefix = -(torch.where(member[:, :, None], w * log_q, 0.0)).sum(dim=1)  # (n_groups, U)
    horizon = torch.where(member, num_units.reshape(-1, K), 0).amax(dim=1)  # T_g
    in_horizon = torch.arange(U, device=S.device)[None, :] < horizon[:, None]
    return (per_prefix * in_horizon).sum(dim=1) / horizon.clamp(min=1).float()


def gnivo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    num_generations: int,
    alpha: float,
    boundaries: torch.Tensor | None = None,
    weight_normalization: WeightNormalization = "softmax",
) -> torch.Tensor:
    """GN-IVO batch loss (SPEC section 3): the mean over groups of ``L_g``.

    ``L_g = (1 / T_g) * sum_{t=1..T_g} [ -sum_{i in g} w_i * log_softmax_{i in g}(S(t))_i ]``, where ``S_i(t)`` is the
    prefix log-ratio ``log pi_theta(y_i,<=t) - log pi_old(y_i,<=t)`` over the first ``t`` units of row ``i`` (held at
    its final value past the row's end), ``T_g`` the group's largest unit count, and ``w`` the target weights of
    :func:`group_weights`. The expectation over ``t ~ U{1..T_g}`` is computed exactly.

    Args:
        logp: ``(B, T)`` log pi_theta of the sampled completion tokens; the loss is differentiable through it.
        old_logp: ``(B, T)`` log pi_old (the policy that sampled the batch); detached.
        mask: ``(B, T)`` 0/1 loss mask.
        rewards: ``(B,)`` rewards; NaN removes a row from its group (no weight, no gradient).
        num_generations: ``K``, rows per group; groups are consecutive rows.
        alpha: reward temperature (> 0).
        boundaries: optional ``(B, T)`` bool unit ends (``None``: every unmasked token is a unit, i.e. token units).
            The last unmasked token of each row is always a boundary, so an all-False tensor gives sequence units.
        weight_normalization: ``"softmax"`` (default, the authors' implementation) or ``"none"`` (Eq. 9).

    Returns:
        0-d float32 tensor.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    prefix = prefix_log_ratios(logp, old_logp, mask, boundaries)
    weights = group_weights(rewards, num_generations, alpha, weight_normalization)
    return gnivo_group_losses(prefix.values, prefix.num_units, weights, num_generations).mean()


def gnivo_linearized_row_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    boundaries: torch.Tensor | None,
    weights: torch.Tensor,
    member: torch.Tensor,
    weight_sum: torch.Tensor,
    group_size: torch.Tensor,
    group_horizon: torch.Tensor,
) -> torch.Tensor:
    """Each row's share of its group loss, linearised at ``S = 0``; needs no group mate in the same batch.

    When the policy has not moved since generation (``logp == old_logp`` in value), the group softmax is uniform,
    ``q_i = 1/K_g``, so ``dL_g/dS_i(t) = (weight_sum / K_g - w_i) / T_g`` depends only on group quantities known at
    generation time. This returns, per row, ``w_i * log K_g + (weight_sum / K_g - w_i) * mean_{t<=T_g} S_i(t)``:
    summed over a group it equals the first-order expansion of ``L_g`` around ``S = 0``, so its value is ``L_g`` and
    its gradient is exactly ``dL_g/dlogp`` at that point. Rows of one group may therefore sit in different
    micro-batches or processes.

    ``sum_{t<=T_g} S_i(t)`` is computed as a token-weighted sum without materialising the prefixes: token ``s``
    appears in every prefix from the unit that contains it up to ``T_g``, i.e. in ``T_g - (boundaries before s)``.

    Args:
        logp, old_logp, mask, boundaries: as in :func:`gnivo_loss`, for the rows at hand.
        weights, member, weight_sum, group_size: ``(B,)`` fields of :class:`GroupWeights` computed on whole groups.
        group_horizon: ``(B,)`` ``T_g`` of each row's group.

    Returns:
        ``(B,)`` float32 row losses (0 for non-members), differentiable through ``logp``.
    """
    valid = mask.bool()
    token_log_ratio = torch.where(valid, logp.float() - old_logp.detach().float(), 0.0)
    closes = unit_boundaries(mask, boundaries).long()
    boundaries_before = closes.cumsum(dim=1) - closes
    horizon = group_horizon.float().clamp(min=1.0)[:, None]
    appearances = (horizon - boundaries_before.float()).clamp(min=0.0)
    mean_prefix = (token_log_ratio * appearances).sum(dim=1) / horizon[:, 0]
    size = group_size.float().clamp(min=1.0)
    coefficient = weight_sum.float() / size - weights.float()
    row_loss = weights.float() * torch.log(size) + coefficient * mean_prefix
    return torch.where(member.bool(), row_loss, 0.0)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"Expected tensors of one shape (B, T), got {shapes}.")
    for name, shape in shapes.items():
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-d (B, T), got shape {shape}.")
