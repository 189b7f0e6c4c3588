"""Loss mathematics of GN-IVO and VIMPO as pure tensor functions.

This module imports nothing from TRL: the functions take plain tensors so that other RL stacks (verl, OpenRLHF,
hand-written loops) can call them, and so that tests can compare them with naive loop implementations. What they
compute is defined on the [Algorithms page](https://gnivo-trl.github.io/gnivo-trl/algorithms/) of the documentation
(`docs/algorithms.md` in the repository).

Conventions shared by every function:

* A batch holds `B = n_groups * K` completions with `K = num_generations`; the rows of group `g` are
  `[g*K, (g+1)*K)`.
* Per-token tensors are `(B, T)`: `T` is the padded completion length, `mask` is 1 on completion tokens that
  take part in the loss (including EOS) and 0 elsewhere.
* Log-probabilities are natural logarithms (nats). Every sum, cumulative sum and softmax runs in float32 whatever the
  input dtype: a bf16 cumulative sum over thousands of tokens is wrong by whole nats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "dual_clip_ppo_loss",
    "exact_token_kl",
    "group_centered_rewards",
    "masked_mean_std",
    "reverse_discounted_cumsum",
    "token_kl_estimate",
    "vimpo_advantages",
    "vimpo_terminal_residuals",
    "vimpo_value_loss",
    "whiten",
    "GroupWeights",
    "PrefixLogRatios",
    "gnivo_linearized_row_loss",
    "gnivo_loss",
    "gnivo_group_losses",
    "group_weights",
    "prefix_log_ratios",
    "unit_boundaries",
    "ValueLossType",
    "candidate_set_kl_from_log_probs",
    "candidate_set_token_kl",
    "soft_value_baselines",
    "soft_vimpo_residuals",
    "soft_vimpo_value_loss",
    "vimpo_reward_baselines",
    "vimpo_value_loss_from_residuals",
    "vimpo_value_loss_norm_denom",
    "vimpo_value_residual_gradient",
    "AdaptiveActorCoeff",
    "adaptive_actor_coeff",
    "logit_gradient_norm_factors",
    "logit_gradient_rms_terms",
]

WeightNormalization = Literal["softmax", "none"]

# Largest R / alpha accepted by the unnormalised ("none") weights. The loss multiplies exp(R / alpha) by -log q summed
# over up to T_g prefixes, so exp(R / alpha) itself fitting in float32 is not enough: this leaves a factor of
# exp(88.72 - 60) ~ 3e12 of headroom for those sums (and for their gradients).
_UNNORMALIZED_WEIGHT_LOGIT_LIMIT = 60.0
# PPO log-ratios are clamped to this before exp(): any ratio above exp(20) ~ 5e8 lies in the clipped region (for every
# dual-clip constant below it), where the gradient is zero anyway, and the clamp keeps exp() and its backward finite.
_LOG_RATIO_CLAMP = 20.0
# Stands in for the log-ratio of a row that is not a group member (NaN reward, masked importance ratio): finite so
# that softmax and its backward never see NaN, low enough that exp() of it is exactly 0.
_EXCLUDED_LOGIT = -1.0e30


# ----------------------------------------------------------------------------------------------------------------------
# GN-IVO
# ----------------------------------------------------------------------------------------------------------------------


class PrefixLogRatios(NamedTuple):
    """Prefix log-ratios of each row, indexed by unit (not by token position).

    Attributes:
        values: `(B, U)` float32, `values[i, t-1] = S_i(t)`, the summed masked log-ratio of the first `t` units
            of row `i`; held at `S_i(n_i)` for `t > n_i` (a finished completion stays in its terminal state).
            `U` is the largest unit count in the batch (at least 1). Differentiable through `logp`.
        num_units: `(B,)` int64, `n_i`, the number of units (boundaries) of each row; 0 for a fully masked row.

    Examples:
        ```python
        import torch

        from gnivo_trl.losses import prefix_log_ratios

        logp = torch.tensor([[-1.0, -2.0, -0.5]])
        old_logp = torch.full_like(logp, -1.0)
        prefix = prefix_log_ratios(logp, old_logp, torch.ones_like(logp))
        print(prefix.values, prefix.num_units)  # S(t) = 0, -1, -0.5 over 3 token units
        ```
    """

    values: torch.Tensor
    num_units: torch.Tensor


def unit_boundaries(mask: torch.Tensor, boundaries: torch.Tensor | None = None) -> torch.Tensor:
    """Positions that close a prefix unit, as a `(B, T)` bool tensor.

    `boundaries` (optional `(B, T)` bool) marks candidate unit ends; `None` means every unmasked token (the
    `token` unit). Masked positions never close a unit, and the last unmasked token of every row always does.
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
    """Per-unit prefix sums `S_i(t)` of the masked log-ratio `logp - old_logp`.

    [Definition](https://gnivo-trl.github.io/gnivo-trl/algorithms/#gnivo-prefix-log-ratio).

    Args:
        logp: `(B, T)` log pi_theta of the sampled tokens (any float dtype; differentiable).
        old_logp: `(B, T)` log pi_old of the same tokens (treated as a constant).
        mask: `(B, T)` 0/1 loss mask.
        boundaries: optional `(B, T)` bool marking positions that close a unit; `None` = every unmasked token.

    Returns:
        [`PrefixLogRatios`][gnivo_trl.losses.PrefixLogRatios] with float32 values of shape `(B, U)`.
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
    """Target weights of each row inside its group (all detached, float32, shape `(B,)`).

    Attributes:
        weights: `w_i` (0 for rows that are not group members).
        member: bool, whether the row takes part in its group (finite reward and non-zero importance ratio).
        weight_sum: `sum_j w_j` over the row's group, broadcast to every row of the group.
        group_size: number of members of the row's group, broadcast to every row of the group.

    Examples:
        ```python
        import torch

        from gnivo_trl.losses import group_weights

        rewards = torch.tensor([1.0, 0.0, 0.0, float("nan")])
        weights = group_weights(rewards, num_generations=4, alpha=0.2)
        print(weights.weights, weights.member)  # the NaN row leaves its group
        ```
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
    """GN-IVO target weights `w_i` per row.

    [Definition](https://gnivo-trl.github.io/gnivo-trl/algorithms/#gnivo-weights).

    Args:
        rewards: `(B,)` scalar rewards; NaN marks a row without a reward (it leaves its group: weight 0, no
            gradient, and it does not count in the group softmax).
        num_generations: `K`; `B` must be a multiple of it and groups are consecutive rows.
        alpha: reward temperature, > 0.
        weight_normalization: `"softmax"` gives `w = softmax_{i in g}(R_i / alpha)` over the group's members;
            `"none"` gives the paper's Eq. 9 weights `exp(R_i / alpha) / K_g` with `K_g` the number of members.
        importance_ratio: optional `(B,)` sequence-level importance ratio pi_old / pi_sampler (vLLM correction).
            It multiplies each member's weight (self-normalised importance weighting of the target distribution);
            a ratio of 0 (a masked sample) removes the row from its group like a NaN reward.

    Returns:
        [`GroupWeights`][gnivo_trl.losses.GroupWeights], all float32 and detached.

    Raises:
        ValueError: if `alpha <= 0`, `B` is not a multiple of `K`, or `weight_normalization="none"` and some
            `R / alpha` overflows float32.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    if weight_normalization not in ("softmax", "none"):
        raise ValueError(f"weight_normalization must be 'softmax' or 'none', got {weight_normalization!r}.")
    B = rewards.numel()
    if num_generations < 1 or B % num_generations != 0:
        raise ValueError(
            f"The batch of {B} rows is not a whole number of groups of num_generations={num_generations}."
        )
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
        if bool((scaled > _UNNORMALIZED_WEIGHT_LOGIT_LIMIT).any()):
            worst = float(scaled.max())
            raise ValueError(
                f"weight_normalization='none' weights rows by exp(R / alpha), but R / alpha reaches {worst:.4g}: "
                f"above {_UNNORMALIZED_WEIGHT_LOGIT_LIMIT:g} the float32 loss and its gradient overflow (exp(88.7) is "
                "float32's largest value). Use weight_normalization='softmax' (shift-invariant), a larger alpha, or "
                "rescale the rewards."
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
    """Exact per-group GN-IVO loss `L_g` from prefix log-ratios of intact, consecutive groups.

    Args:
        prefix_values: `(B, U)` float32 `S_i(t)` (see [`prefix_log_ratios`][gnivo_trl.losses.prefix_log_ratios]);
            differentiable.
        num_units: `(B,)` unit counts `n_i`.
        weights: the rows' [`GroupWeights`][gnivo_trl.losses.GroupWeights].
        num_generations: `K`.

    Returns:
        `(n_groups,)` float32 `L_g = (1/T_g) sum_{t <= T_g} -sum_i w_i log softmax_i(S(t))`, with `T_g` the
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
    """GN-IVO batch loss: the mean over groups of `L_g`.

    [Definition](https://gnivo-trl.github.io/gnivo-trl/algorithms/#gnivo-loss).

    `L_g = (1 / T_g) * sum_{t=1..T_g} [ -sum_{i in g} w_i * log_softmax_{i in g}(S(t))_i ]`, where `S_i(t)` is the
    prefix log-ratio `log pi_theta(y_i,<=t) - log pi_old(y_i,<=t)` over the first `t` units of row `i` (held at
    its final value past the row's end), `T_g` the group's largest unit count, and `w` the target weights of
    [`group_weights`][gnivo_trl.losses.group_weights]. The expectation over `t ~ U{1..T_g}` is computed exactly.

    Args:
        logp: `(B, T)` log pi_theta of the sampled completion tokens; the loss is differentiable through it.
        old_logp: `(B, T)` log pi_old (the policy that sampled the batch); detached.
        mask: `(B, T)` 0/1 loss mask.
        rewards: `(B,)` rewards; NaN removes a row from its group (no weight, no gradient).
        num_generations: `K`, rows per group; groups are consecutive rows.
        alpha: reward temperature (> 0).
        boundaries: optional `(B, T)` bool unit ends (`None`: every unmasked token is a unit, i.e. token units).
            The last unmasked token of each row is always a boundary, so an all-False tensor gives sequence units.
        weight_normalization: `"softmax"` (default, the authors' implementation) or `"none"` (Eq. 9).

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
    """Each row's share of its group loss, linearised at `S = 0`; needs no group mate in the same batch.

    When the policy has not moved since generation (`logp == old_logp` in value), the group softmax is uniform,
    `q_i = 1/K_g`, so `dL_g/dS_i(t) = (weight_sum / K_g - w_i) / T_g` depends only on group quantities known at
    generation time. This returns, per row, `w_i * log K_g + (weight_sum / K_g - w_i) * mean_{t<=T_g} S_i(t)`:
    summed over a group it equals the first-order expansion of `L_g` around `S = 0`, so its value is `L_g` and
    its gradient is exactly `dL_g/dlogp` at that point. Rows of one group may therefore sit in different
    micro-batches or processes.

    `sum_{t<=T_g} S_i(t)` is computed as a token-weighted sum without materialising the prefixes: token `s`
    appears in every prefix from the unit that contains it up to `T_g`, i.e. in `T_g - (boundaries before s)`.

    Args:
        logp: `(B, T)` as in [`gnivo_loss`][gnivo_trl.losses.gnivo_loss], for the rows at hand; differentiable.
        old_logp: `(B, T)` as in `gnivo_loss`.
        mask: `(B, T)` as in `gnivo_loss`.
        boundaries: `(B, T)` bool or None, as in `gnivo_loss`.
        weights: `(B,)` the `weights` field of [`GroupWeights`][gnivo_trl.losses.GroupWeights], computed on whole
            groups.
        member: `(B,)` its `member` field.
        weight_sum: `(B,)` its `weight_sum` field.
        group_size: `(B,)` its `group_size` field.
        group_horizon: `(B,)` `T_g` of each row's group.

    Returns:
        `(B,)` float32 row losses (0 for non-members and for the rows of a group without units), differentiable
        through `logp`.
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
    # A group without any unit (every member's tokens masked) has L_g = 0, as gnivo_group_losses gives it.
    return torch.where(member.bool() & (group_horizon > 0), row_loss, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# VIMPO
# ----------------------------------------------------------------------------------------------------------------------

KLEstimator = Literal["exact", "k2", "k3"]


def group_centered_rewards(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """`R_i - mean_{j in g(i)} R_j` (no std scaling), float32 `(B,)`.

    NaN rewards (no reward) are left out of the group mean and stay NaN; a group without any reward is all NaN.
    """
    B = rewards.numel()
    if num_generations < 1 or B % num_generations != 0:
        raise ValueError(
            f"The batch of {B} rows is not a whole number of groups of num_generations={num_generations}."
        )
    grouped = rewards.detach().float().reshape(-1, num_generations)
    return (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).reshape(-1)


def vimpo_terminal_residuals(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    token_kl: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Residual of the policy-implied terminal value per row: `sum_s mask * (rho - sg[kappa]) - target`.

    `rho = beta * (logp - ref_logp)`, `kappa = beta * token_kl` (detached). Float32 `(B,)`, differentiable
    through `logp` only; NaN where `targets` is NaN.
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp, token_kl=token_kl, mask=mask)
    valid = mask.bool()
    per_token = beta * (logp.float() - ref_logp.detach().float() - token_kl.detach().float())
    implied_value = torch.where(valid, per_token, 0.0).sum(dim=1)
    return implied_value - targets.detach().float()


def vimpo_value_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    token_kl: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    num_generations: int,
    beta: float,
    *,
    loss_type: ValueLossType = "squared_error",
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """VIMPO value loss, a 0-d float32 tensor.

    [Definition](https://gnivo-trl.github.io/gnivo-trl/algorithms/#vimpo-value-loss).

    `L_V = mean_i 0.5 * (sum_s mask[i,s] * (rho[i,s] - sg(kappa[i,s])) - (R_i - mean_{j in g(i)} R_j))^2` with
    `rho = beta * (logp - ref_logp)` and `kappa = beta * token_kl`; a sum over tokens (no length normalisation),
    a group-centred target without std scaling, and the mean over the `B` rows given. Rows whose reward is NaN
    contribute 0 (they still count in `B`, so the scale does not depend on how many rewards are missing). The
    trainer leaves rows without any loss token (truncated completions with `mask_truncated_completions=True`) out of
    its mean; pass only the rows that have tokens to do the same.

    Args:
        logp: `(B, T)` log pi_theta of the sampled tokens; the only differentiable input.
        ref_logp: `(B, T)` log pi_ref (frozen initial model) of the same tokens.
        token_kl: `(B, T)` per-token KL(pi_theta || pi_ref) in nats (exact or an estimate); detached.
        mask: `(B, T)` 0/1 loss mask.
        rewards: `(B,)` rewards, groups of `num_generations` consecutive rows.
        num_generations: `K`.
        beta: VIMPO's KL coefficient (`vimpo_beta`).
        loss_type: the per-row loss of the residual (official `vimpo_value_loss_type`): `"squared_error"` is the
            `0.5 * r^2` above; for `"huber"` see
            [`vimpo_value_loss_from_residuals`][gnivo_trl.losses.vimpo_value_loss_from_residuals].
        huber_delta: the Huber threshold of `loss_type="huber"`.
    """
    targets = group_centered_rewards(rewards, num_generations)
    has_target = ~torch.isnan(targets)
    # Zero the NaN targets before the residual, not after squaring: backward of where() would still see 0 * NaN.
    residuals = vimpo_terminal_residuals(logp, ref_logp, token_kl, mask, torch.nan_to_num(targets, nan=0.0), beta)
    per_row = vimpo_value_loss_from_residuals(residuals, loss_type, huber_delta)
    return torch.where(has_target, per_row, 0.0).sum() / max(rewards.numel(), 1)


def reverse_discounted_cumsum(values: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """`A[s] = sum_{l>=0} discount^l values[s_l]` over the unmasked positions `s = s_0 < s_1 < ...` of each row,
    0 at masked positions; float32 `(B, T)`.

    Masked positions inside a row (tool output in a multi-turn rollout) are passed through, not a reset: the
    accumulation carries across them unchanged, so a token before a hole is credited with what follows it, as
    the official implementation carries values and GAE through masked positions
    ([holes](https://gnivo-trl.github.io/gnivo-trl/algorithms/#vimpo-advantage)). Computed by
    recursive doubling (`ceil(log2 T)` vector steps, no loop over positions) of `a[s] = x[s] + g[s] a[s+1]` with
    `x = values, g = discount` at unmasked and `x = 0, g = 1` at masked positions: after step `k`,
    `a[s] = X[s] + G[s] * a[s + 2^k]`. Only products of factors in `[0, 1]` appear, so nothing overflows for long
    sequences (unlike rescaling by `discount**-s`).
    """
    valid = mask.bool()
    accumulated = torch.where(valid, values.float(), 0.0)
    carry = torch.where(valid, torch.full_like(accumulated, float(discount)), 1.0)
    T = values.size(1)
    shift = 1
    while shift < T:
        accumulated = accumulated + carry * F.pad(accumulated[:, shift:], (0, shift))
        carry = carry * F.pad(carry[:, shift:], (0, shift))
        shift *= 2
    return torch.where(valid, accumulated, 0.0)


@torch.no_grad()
def vimpo_advantages(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    token_kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    gae_lambda: float = 1.0,
) -> torch.Tensor:
    """VIMPO's reward-free actor advantage before whitening, detached float32 `(B, T)`.

    [Definition](https://gnivo-trl.github.io/gnivo-trl/algorithms/#vimpo-advantage).

    `delta = beta * (logp - ref_logp - token_kl)` and `A[s] = sum_{l>=0} lambda^l delta[s_l]` over the unmasked
    positions `s = s_0 < s_1 < ...` of the row: holes in the mask (tool output) are passed through, so a token before
    a tool call is credited with the model tokens after the tool's answer (0 at masked positions).
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp, token_kl=token_kl, mask=mask)
    delta = beta * (logp.float() - ref_logp.float() - token_kl.float())
    return reverse_discounted_cumsum(delta, mask, gae_lambda)


def masked_mean_std(
    values: torch.Tensor,
    mask: torch.Tensor,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (Bessel-corrected) std of `values` over `mask`, both 0-d float32.

    `all_reduce_sum` (optional) sums a tensor over processes; with it the statistics cover every process's valid
    entries (two reductions: the sum and count, then the squared deviations from the global mean).
    """
    reduce = all_reduce_sum if all_reduce_sum is not None else (lambda tensor: tensor)
    valid = mask.bool()
    total, count = reduce(torch.stack([torch.where(valid, values.float(), 0.0).sum(), valid.sum().float()]))
    mean = total / count.clamp(min=1.0)
    squared = reduce(torch.where(valid, (values.float() - mean).square(), 0.0).sum())
    return mean, (squared / (count - 1).clamp(min=1.0)).sqrt()


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """`(values - mean) / sqrt(std^2 + eps)` on valid positions, 0 elsewhere; float32.

    The epsilon sits under the square root, as in verl's `masked_whiten` (what the official VIMPO run uses), not
    added to the std: when the values are pure rounding noise (std ~ 1e-9, e.g. right after initialisation, when
    `rho - kappa` is 0 up to float error) `std + eps` would blow that noise up to unit scale, while
    `sqrt(std^2 + eps)` >= 1e-4 keeps it negligible. For any std well above 1e-4 the two forms agree.

    `mean` and `std` default to [`masked_mean_std`][gnivo_trl.losses.masked_mean_std] of the tensor itself; a trainer
    passes statistics reduced over every process so that the result does not depend on how the batch is split.
    """
    if mean is None or std is None:
        mean, std = masked_mean_std(values, mask)
    return torch.where(mask.bool(), (values.float() - mean) * torch.rsqrt(std.float().square() + eps), 0.0)


def dual_clip_ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    dual_clip: float = 10.0,
) -> torch.Tensor:
    """Per-token PPO clipped surrogate with dual clip (unreduced `(B, T)` float32; reduce it with the mask).

    `r = exp(logp - old_logp)`; `loss = max(-A r, -A clip(r, 1 - epsilon_low, 1 + epsilon_high))`, and for
    `A < 0` additionally `min(loss, -A * dual_clip)`, which bounds the loss of a very unlikely-under-pi_old token.
    The log-ratio is clamped to [-20, 20] before `exp` (as verl does): beyond it every branch is clipped, and the
    clamp keeps the backward free of `0 * inf`.
    """
    advantages = advantages.detach().float()
    log_ratio = logp.float() - old_logp.detach().float()
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)
    return torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)


def token_kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token sampled estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs, detached float32.

    `"k2"`: `0.5 * (logp - ref_logp)^2`; `"k3"`: `exp(ref_logp - logp) - (ref_logp - logp) - 1`. (`"k1"`,
    `logp - ref_logp`, is not offered: VIMPO's `rho - kappa` would then be identically zero.)
    """
    log_ratio = logp.detach().float() - ref_logp.detach().float()
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"Unknown sampled KL estimator {estimator!r}; use 'k2' or 'k3' (or the exact KL).")


def exact_token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(softmax(policy_logits / T) || softmax(ref_logits / T)) per row, float32 `(N,)`, from `(N, V)`.

    For stacks that hold logits (verl, OpenRLHF); it materialises two float32 `(N, V)` tensors, so call it on
    chunks of tokens. `VIMPOTrainer` never forms logits: it computes the same KL from hidden states in one tiled
    float32 pass of both LM heads (`gnivo_trl.scoring.policy_reference_scores`).
    """
    return _kl_from_log_probs_(_log_softmax(policy_logits, temperature), _log_softmax(ref_logits, temperature))


def _kl_from_log_probs_(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    # KL = sum_v p * (log p - log q) = -sum_v p * (log q - log p). Both inputs are overwritten in place (q's
    # log-probs by the log-ratio, p's by p times it): no (N, V) temporary, whose allocation (page faults on CPU)
    # cost more than the arithmetic, and a plain reduction, which on CPU ran 3x faster than a batched dot product
    # (benchmarks/results/archive/scoring_profile.md).
    log_ratio = ref_log_probs.sub_(policy_log_probs)
    return policy_log_probs.exp_().mul_(log_ratio).sum(dim=-1).neg_()


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # At temperature 1 (TRL's default) skip the division: a full (n, V) pass and allocation. Not in place: the
    # logits are the caller's.
    logits = logits.float()
    return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"Expected tensors of one shape (B, T), got {shapes}.")
    for name, shape in shapes.items():
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-d (B, T), got shape {shape}.")


# ----------------------------------------------------------------------------------------------------------------------
# VIMPO options of the official implementation
# ----------------------------------------------------------------------------------------------------------------------
# Options of the authors' code (backprop07/VIMPO, recipe/vimpo/vimpo_core_algos.py) that the default VIMPO objective
# (docs/algorithms.md#vimpo) does not use: the Huber value loss, the value-loss normaliser, the capped group baseline
# (``vimpo_cap_v0``), the candidate-set KL (``vimpo_kl_estimator="candidate_set"``) and the trajectory-level soft value
# (``value_type="soft"``). Each function reproduces the official semantics; the docstrings say where they differ only
# by this package's conventions (NaN marks a row without a reward; groups are consecutive rows instead of uids).

ValueLossType = Literal["squared_error", "huber"]


def vimpo_value_loss_from_residuals(
    residuals: torch.Tensor,
    loss_type: ValueLossType = "squared_error",
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """Per-row VIMPO value loss of terminal residuals `r` (official `_compute_terminal_value_loss_stats`).

    `"squared_error"`: `0.5 * r^2`. `"huber"`: `0.5 * r^2` where `|r| <= delta`, else
    `delta * (|r| - 0.5 * delta)` (PyTorch's `huber_loss` convention, continuous with slope `delta` outside, not
    divided by `delta` as `smooth_l1_loss` is); its gradient is `clamp(r, -delta, delta)`.

    Args:
        residuals: `(B,)` residuals in the value's units (reward units, the `beta`-scaled log-ratio sum minus the
            target), e.g. from [`vimpo_terminal_residuals`][gnivo_trl.losses.vimpo_terminal_residuals]; differentiable.
        loss_type: `"squared_error"` or `"huber"`.
        huber_delta: Huber threshold `delta` (> 0, checked whatever `loss_type` is, as the official code does).

    Returns:
        Float32 `(B,)` per-row losses, unreduced (the official loss is their mean over the rows of the micro-batch,
        then times `vimpo_value_loss_coeff` and, with `vimpo_value_loss_normalized`, divided by
        [`vimpo_value_loss_norm_denom`][gnivo_trl.losses.vimpo_value_loss_norm_denom]). NaN residuals stay NaN.
    """
    if loss_type not in ("squared_error", "huber"):
        raise ValueError(f"loss_type must be 'squared_error' or 'huber', got {loss_type!r}.")
    if not huber_delta > 0:
        raise ValueError(f"huber_delta must be positive, got {huber_delta}.")
    residuals = residuals.float()
    half_squared = 0.5 * residuals.square()
    if loss_type == "squared_error":
        return half_squared
    magnitude = residuals.abs()
    return torch.where(magnitude <= huber_delta, half_squared, huber_delta * (magnitude - 0.5 * huber_delta))


def vimpo_value_loss_norm_denom(targets: torch.Tensor) -> torch.Tensor:
    """Denominator of the normalised value loss (`vimpo_value_loss_normalized=True`): `mean_i target_i^2`.

    The official trainer (`compute_value_loss_norm_denom`, called by `_attach_value_loss_norm_denom`) computes it
    once per training step over the whole actor-update batch (every prompt of the step, all processes), with
    `target = R - V0` (the raw or the soft baseline), and refuses a value below `1e-4`; the value loss of every
    micro-batch is then `coeff * mean_rows(loss) / denom`. Here NaN targets (rows without a reward) are left out
    of the mean. Detached float32 0-d tensor (NaN when no target is finite).
    """
    targets = targets.detach().float().reshape(-1)
    finite = ~torch.isnan(targets)
    return torch.where(finite, targets, 0.0).square().sum() / finite.sum().float()


def vimpo_reward_baselines(rewards: torch.Tensor, num_generations: int, cap_v0: float | None = None) -> torch.Tensor:
    """Raw VIMPO's per-prompt baseline `V0 = min(mean_{j in g(i)} R_j, cap_v0)` (official
    `compute_reward_baseline_by_uid`); the value target is `R_i - V0_i`.

    `cap_v0` (`vimpo_cap_v0`) caps the group mean from above only; `None` (the official default) gives the
    plain group mean, so `rewards - vimpo_reward_baselines(rewards, K)` equals
    [`group_centered_rewards`][gnivo_trl.losses.group_centered_rewards]. NaN rewards are left out of the group mean; a
    group without any reward gets NaN. Detached float32 `(B,)`.
    """
    B = rewards.numel()
    if num_generations < 1 or B % num_generations != 0:
        raise ValueError(
            f"The batch of {B} rows is not a whole number of groups of num_generations={num_generations}."
        )
    grouped = rewards.detach().float().reshape(-1, num_generations)
    baselines = torch.nanmean(grouped, dim=1, keepdim=True).expand(-1, num_generations).reshape(-1)
    return baselines if cap_v0 is None else baselines.clamp(max=float(cap_v0))


def candidate_set_kl_from_log_probs(
    policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor, topk: int
) -> torch.Tensor:
    """Official `candidate_set` KL from full-vocabulary log-probabilities (`(N, V)` each).

    `sum_{v in C} p(v) * (log p(v) - log q(v))` with `C` the `min(topk, V)` tokens of largest policy
    probability. `p` and `q` stay normalised over the whole vocabulary (nothing is renormalised over `C`) and
    the sampled token is not added to `C`; the truncated sum can therefore be slightly negative, and it tends to
    the exact KL as `topk` grows (equal at `topk >= V`). Selecting by log-prob is selecting by logit (the same
    per-row order); ties at the boundary of `C` are broken as `torch.topk` breaks them.

    Float32 `(N,)`; differentiable through both inputs (the official code runs it under no_grad by default,
    `vimpo_detach_kl=True`, and VIMPO's value loss detaches it in any case).
    """
    if topk <= 0:
        raise ValueError(f"topk must be > 0, got {topk}.")
    if policy_log_probs.shape != ref_log_probs.shape or policy_log_probs.dim() != 2:
        raise ValueError(
            f"Expected two (N, V) tensors of one shape, got {tuple(policy_log_probs.shape)} and "
            f"{tuple(ref_log_probs.shape)}."
        )
    policy_log_probs = policy_log_probs.float()
    k = min(int(topk), policy_log_probs.size(-1))
    index = torch.topk(policy_log_probs.detach(), k=k, dim=-1, largest=True, sorted=False).indices
    policy_candidates = policy_log_probs.gather(-1, index)
    ref_candidates = ref_log_probs.float().gather(-1, index)
    return (policy_candidates.exp() * (policy_candidates - ref_candidates)).sum(dim=-1)


def candidate_set_token_kl(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, topk: int, temperature: float = 1.0
) -> torch.Tensor:
    """Official `candidate_set` approximation of KL(pi_theta || pi_ref) per row, float32 `(N,)` from `(N, V)`.

    Official `compute_candidate_topk_flat_kl_from_logits` on logits divided by the sampling temperature (the
    official actor divides both models' logits by it before any KL): the candidates are the `min(topk, V)`
    tokens of largest *policy* logit, and the sum runs over them with both log-probabilities normalised over the
    full vocabulary (see [`candidate_set_kl_from_log_probs`][gnivo_trl.losses.candidate_set_kl_from_log_probs]).
    Materialises float32 `(N, V)` log-softmaxes: call it on chunks of tokens, like
    [`exact_token_kl`][gnivo_trl.losses.exact_token_kl].
    """
    return candidate_set_kl_from_log_probs(
        _log_softmax(policy_logits, temperature), _log_softmax(ref_logits, temperature), topk
    )


def soft_value_baselines(
    rewards: torch.Tensor,
    old_token_kl_sums: torch.Tensor,
    num_generations: int,
    beta: float,
    cap_v0: float | None = None,
) -> torch.Tensor:
    """Soft VIMPO's per-prompt baseline (official `compute_soft_value_baseline_by_uid`), detached float32 `(B,)`.

    `V0_i = min(mean_{j in g(i)} (R_j - beta * K_j), cap_v0)`, the group mean of the soft return, where
    `K_j = sum_s mask[j,s] * KL_old[j,s]` is the summed per-token KL(pi_old || pi_ref) of row `j` measured at
    generation time under the policy that sampled it (`pi_old`; the official code computes it without gradient
    in the old-log-prob pass, with the configured estimator: exact, candidate_set, or k1/k2/k3 of the sampled
    tokens). `cap_v0=None` (the official default) does not cap. Rows whose reward is NaN are left out of the mean.

    Args:
        rewards: `(B,)` scalar rewards (groups of `num_generations` consecutive rows).
        old_token_kl_sums: `(B,)` `K_j` in nats.
        num_generations: `K`.
        beta: `vimpo_beta`.
        cap_v0: optional upper bound on `V0` (`vimpo_cap_v0`).
    """
    if old_token_kl_sums.shape != rewards.shape:
        raise ValueError(f"Expected old_token_kl_sums of shape {tuple(rewards.shape)}, got {old_token_kl_sums.shape}.")
    soft_returns = rewards.detach().float() - beta * old_token_kl_sums.detach().float()
    return vimpo_reward_baselines(soft_returns, num_generations, cap_v0)


def soft_vimpo_residuals(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Soft VIMPO's terminal residual per row: `beta * sum_s mask * (logp - ref_logp) - target`, float32 `(B,)`.

    Official `compute_soft_trajectory_vimpo_loss`: the prediction is the current policy's summed log-ratio to the
    reference (no KL subtracted, unlike raw VIMPO's `sum (rho - kappa)`), the target `R_i - V0_i` with `V0`
    from [`soft_value_baselines`][gnivo_trl.losses.soft_value_baselines]. Differentiable through `logp` only; NaN where
    `targets` is NaN.
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    log_ratio = torch.where(mask.bool(), logp.float() - ref_logp.detach().float(), 0.0)
    return beta * log_ratio.sum(dim=1) - targets.detach().float()


def soft_vimpo_value_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    baselines: torch.Tensor,
    beta: float,
    loss_type: ValueLossType = "squared_error",
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """Soft VIMPO value loss, a 0-d float32 tensor: `mean_i loss(beta * sum_s mask * (logp - ref) - (R_i - V0_i))`.

    `loss` is [`vimpo_value_loss_from_residuals`][gnivo_trl.losses.vimpo_value_loss_from_residuals] (`0.5 r^2` or
    Huber), `V0` the detached [`soft_value_baselines`][gnivo_trl.losses.soft_value_baselines]. The mean runs over the
    `B` rows given (the official code: over the micro-batch); rows whose reward is NaN contribute 0 and still count in
    `B`. Differentiable through `logp` only. The official `vimpo_value_loss_coeff` and normaliser are left to the
    caller.
    """
    targets = rewards.detach().float() - baselines.detach().float()
    has_target = ~torch.isnan(targets)
    residuals = soft_vimpo_residuals(logp, ref_logp, mask, torch.nan_to_num(targets, nan=0.0), beta)
    per_row = vimpo_value_loss_from_residuals(residuals, loss_type, huber_delta)
    return torch.where(has_target, per_row, 0.0).sum() / max(rewards.numel(), 1)


def vimpo_value_residual_gradient(
    residuals: torch.Tensor,
    loss_type: ValueLossType = "squared_error",
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """Derivative of [`vimpo_value_loss_from_residuals`][gnivo_trl.losses.vimpo_value_loss_from_residuals] with respect
    to the residual, detached float32 `(B,)`.

    `"squared_error"`: `r`; `"huber"`: `clamp(r, -delta, delta)` (at `|r| = delta` both pieces agree).
    """
    if loss_type not in ("squared_error", "huber"):
        raise ValueError(f"loss_type must be 'squared_error' or 'huber', got {loss_type!r}.")
    residuals = residuals.detach().float()
    return residuals if loss_type == "squared_error" else residuals.clamp(-huber_delta, huber_delta)


# ----------------------------------------------------------------------------------------------------------------------
# VIMPO's adaptive actor coefficient (official ``vimpo_adaptive_actor_coeff``)
# ----------------------------------------------------------------------------------------------------------------------
# A loss that depends on the logits z of one position only through log p_y = log_softmax(z)_y has the logit gradient
# c * (e_y - p), with c its derivative with respect to log p_y. Its norm is |c| * ||e_y - p||_2, and
# ||e_y - p||_2^2 = 1 - 2 p_y + sum_v p_v^2: the value and the actor loss both have that form, so their logit-gradient
# RMS needs only the per-token coefficients, p_y and sum_v p_v^2 (official ``compute_vimpo_*_logit_grad_rms``).


def logit_gradient_norm_factors(logp: torch.Tensor, probability_square_sums: torch.Tensor) -> torch.Tensor:
    """`||e_y - p||_2 = sqrt(1 - 2 p_y + sum_v p_v^2)` per token, detached float32, the shape of the inputs.

    Args:
        logp: log-probabilities `log p_y` of the sampled tokens (any shape).
        probability_square_sums: `sum_v p_v^2` of the same positions' full distributions, same shape.

    The radicand is clamped at 0: for a near-certain token (`p_y -> 1`) it is `(1 - p_y)^2 + sum_{v != y} p_v^2`
    computed as a difference of numbers near 1, which float32 rounding can push slightly below 0.
    """
    p_y = logp.detach().float().exp()
    return (1.0 - 2.0 * p_y + probability_square_sums.detach().float()).clamp(min=0.0).sqrt()


def logit_gradient_rms_terms(coefficients: torch.Tensor, factors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of squared per-token logit-gradient norms and the token count, float32 `(2,)`, detached.

    `[sum_t mask_t * (c_t * factor_t)^2, sum_t mask_t]` with `c_t` the loss's derivative with respect to
    `log p_y` at token `t` and `factor_t` from
    [`logit_gradient_norm_factors`][gnivo_trl.losses.logit_gradient_norm_factors]. Summed over processes (and
    micro-batches, if wanted), the RMS of the logit-gradient norm over the valid tokens is `sqrt(sum / count)`
    (official `_global_logit_grad_rms`). Masked positions contribute nothing whatever they hold.
    """
    valid = mask.bool()
    norms = torch.where(valid, coefficients.detach().float() * factors.detach().float(), 0.0)
    return torch.stack([norms.square().sum(), valid.sum().float()])


class AdaptiveActorCoeff(NamedTuple):
    """One update of the adaptive actor coefficient (plain floats).

    Attributes:
        coeff: the actor weight of this micro-batch's loss.
        value_ema: the value loss's logit-gradient RMS, exponentially averaged (no bias correction).
        actor_ema: the unscaled actor loss's logit-gradient RMS, exponentially averaged (no bias correction).

    Examples:
        ```python
        from gnivo_trl.losses import adaptive_actor_coeff

        # No actor gradient yet (the policy still equals the reference):
        # weight 0, averages unchanged.
        first = adaptive_actor_coeff(
            0.0, 0.0, 2.0, 0.0, alpha=0.025, decay=0.9, eps=1e-12
        )
        print(first.coeff, first.value_ema)  # 0.0 0.0
        step = adaptive_actor_coeff(
            0.0, 0.0, 2.0, 40.0, alpha=0.025, decay=0.9, eps=1e-12
        )
        print(step.coeff)  # 0.025 * 0.2 / 4.0 = 0.00125
        ```
    """

    coeff: float
    value_ema: float
    actor_ema: float


def adaptive_actor_coeff(
    value_ema: float,
    actor_ema: float,
    value_rms: float,
    actor_rms: float,
    alpha: float,
    decay: float,
    eps: float,
) -> AdaptiveActorCoeff:
    """Official `compute_vimpo_adaptive_actor_coeff`: the actor weight that keeps the actor's logit-gradient RMS at
    `alpha` times the value's, both smoothed over micro-batches.

    If `actor_rms > 0`: `value_ema <- decay * value_ema + (1 - decay) * value_rms`, the same for `actor_ema`,
    and `coeff = alpha * value_ema / (actor_ema + eps)`. Otherwise (no actor gradient in this micro-batch, e.g. all
    advantages 0) `coeff = 0` and both averages are returned unchanged. There is no bias correction: both averages
    start at 0 and carry the same weights, so it cancels in the ratio (up to `eps`).
    """
    if not actor_rms > 0:
        return AdaptiveActorCoeff(0.0, value_ema, actor_ema)
    value_ema = decay * value_ema + (1.0 - decay) * value_rms
    actor_ema = decay * actor_ema + (1.0 - decay) * actor_rms
    return AdaptiveActorCoeff(alpha * value_ema / (actor_ema + eps), value_ema, actor_ema)
