"""GN-IVO loss (docs/algorithms.md#gnivo-loss) against a naive float64 loop implementation, plus its documented
properties.

The reference below is written from docs/algorithms.md alone: explicit Python loops over groups, rows, prefix index
``t`` and token positions, in float64. ``gnivo_trl.losses`` must agree with it in value and gradient
(docs/algorithms.md#tested-against-naive).
"""

from __future__ import annotations

import math

import pytest
import torch

from gnivo_trl.losses import (
    gnivo_group_losses,
    gnivo_linearized_row_loss,
    gnivo_loss,
    group_weights,
    prefix_log_ratios,
    unit_boundaries,
)

# ----------------------------------------------------------------------------------------------------------------------
# Naive float64 reference (docs/algorithms.md#gnivo-loss), deliberately slow and literal.
# ----------------------------------------------------------------------------------------------------------------------


def naive_boundary_positions(mask_row: list[bool], boundary_row: list[bool] | None) -> list[int]:
    """Positions that close a unit: token units = every unmasked token; step units = given boundaries that are
    unmasked; in every case the last unmasked token of the row closes a unit."""
    unmasked = [s for s in range(len(mask_row)) if mask_row[s]]
    if boundary_row is None:
        positions = list(unmasked)
    else:
        positions = [s for s in unmasked if boundary_row[s]]
    if unmasked and unmasked[-1] not in positions:
        positions.append(unmasked[-1])
    return sorted(positions)


def naive_gnivo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    num_generations: int,
    alpha: float,
    boundaries: torch.Tensor | None = None,
    weight_normalization: str = "softmax",
) -> torch.Tensor:
    """The GN-IVO batch loss of docs/algorithms.md#gnivo-loss, float64, differentiable through ``logp`` (which may require grad)."""
    B, T = mask.shape
    K = num_generations
    mask_rows = [[bool(mask[i, s] != 0) for s in range(T)] for i in range(B)]
    reward_values = [float(rewards[i]) for i in range(B)]
    zero = logp.new_zeros((), dtype=torch.float64)

    # S_i(t) for t = 1..n_i, as a Python list per row; only unmasked positions are ever read.
    prefix = []
    for i in range(B):
        boundary_row = None if boundaries is None else [bool(boundaries[i, s]) for s in range(T)]
        closes = naive_boundary_positions(mask_rows[i], boundary_row)
        row_prefix = []
        for b in closes:
            total = zero
            for s in range(b + 1):
                if mask_rows[i][s]:
                    total = total + (logp[i, s].double() - old_logp[i, s].detach().double())
            row_prefix.append(total)
        prefix.append(row_prefix)

    def S(i: int, t: int) -> torch.Tensor:  # t is 1-based; held at S_i(n_i) past the row's end; 0 if n_i = 0
        n_i = len(prefix[i])
        if n_i == 0:
            return zero
        return prefix[i][min(t, n_i) - 1]

    group_losses = []
    for g in range(B // K):
        rows = range(g * K, (g + 1) * K)
        members = [i for i in rows if not math.isnan(reward_values[i])]
        if not members:
            group_losses.append(zero)
            continue
        horizon = max(len(prefix[i]) for i in members)
        if horizon == 0:
            group_losses.append(zero)
            continue
        scaled = {i: reward_values[i] / alpha for i in members}
        if weight_normalization == "softmax":
            top = max(scaled.values())
            denominator = sum(math.exp(scaled[j] - top) for j in members)
            w = {i: math.exp(scaled[i] - top) / denominator for i in members}
        elif weight_normalization == "none":
            w = {i: math.exp(scaled[i]) / len(members) for i in members}
        else:
            raise AssertionError(weight_normalization)
        total = zero
        for t in range(1, horizon + 1):
            logits = [S(i, t) for i in members]
            log_normalizer = torch.logsumexp(torch.stack(logits), dim=0)
            for i in members:
                total = total - w[i] * (S(i, t) - log_normalizer)
        group_losses.append(total / horizon)
    return torch.stack(group_losses).mean()


# ----------------------------------------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------------------------------------


def make_case(seed: int, K: int, units: str, *, n_groups: int | None = None, nan_rewards: bool = False):
    """Random float64 batch: ragged right-padded lengths, a fully masked row, a row with a hole in its mask,
    random step boundaries (``units="step"``), all-False boundaries (``"sequence"``) or None (``"token"``)."""
    g = torch.Generator().manual_seed(seed)
    if n_groups is None:
        n_groups = 1 + seed % 3
    B = n_groups * K
    T = int(torch.randint(4, 11, (1,), generator=g))
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[int(torch.randint(0, B, (1,), generator=g))] = T  # at least one full-length row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    if B >= 3:
        mask[B - 1] = 0.0  # a fully masked row (n_i = 0, S_i = 0, still a group member)
        hole_row = 0
        mask[hole_row] = 0.0
        mask[hole_row, : min(T, 4)] = 1.0
        mask[hole_row, 1] = 0.0  # a hole inside the row's mask
    logp = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old_logp = logp + 0.7 * torch.randn(B, T, generator=g, dtype=torch.float64)
    if seed % 2 == 0:
        rewards = torch.rand(B, generator=g, dtype=torch.float64)
    else:  # binary rewards: ties inside groups, as with verifiable rewards
        rewards = torch.randint(0, 2, (B,), generator=g).double()
    if nan_rewards:
        rewards[int(torch.randint(0, B, (1,), generator=g))] = float("nan")
    if units == "token":
        boundaries = None
    elif units == "step":
        boundaries = torch.rand(B, T, generator=g) < 0.35
    elif units == "sequence":
        boundaries = torch.zeros(B, T, dtype=torch.bool)
    else:
        raise AssertionError(units)
    return logp, old_logp, mask, rewards, boundaries


def fill_masked(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.full_like(x, value))


def run_library(logp64, old64, mask, rewards, K, alpha, boundaries, weight_normalization):
    """gnivo_loss on float32 inputs cast from the float64 ones; returns (loss, grad wrt logp)."""
    logp = logp64.float().requires_grad_(True)
    loss = gnivo_loss(
        logp,
        old64.float(),
        mask.float(),
        rewards.float(),
        K,
        alpha,
        boundaries=boundaries,
        weight_normalization=weight_normalization,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad


def run_naive(logp64, old64, mask, rewards, K, alpha, boundaries, weight_normalization):
    logp = logp64.clone().requires_grad_(True)
    loss = naive_gnivo_loss(logp, old64, mask, rewards, K, alpha, boundaries, weight_normalization)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    """float32 vs float64 gradients: absolute tolerance scaled by the gradient's magnitude (the "none" weights can
    reach exp(R/alpha)/K ~ 1e2)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=atol * scale)


# ----------------------------------------------------------------------------------------------------------------------
# 1. The naive reference itself, on cases computed by hand
# ----------------------------------------------------------------------------------------------------------------------


def test_naive_reference_matches_hand_computed_two_row_group():
    # Row 0: 2 tokens (token units: S(1)=a, S(2)=a+b); row 1: 1 token (S(1)=c, held at c for t=2). T_g = 2.
    a, b, c = 0.3, -0.5, 0.2
    logp = torch.tensor([[a, b], [c, 9.0]], dtype=torch.float64)
    old = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    alpha = 0.5
    w0 = math.exp(2.0) / (math.exp(2.0) + 1.0)
    w1 = 1.0 - w0

    def ce(s0: float, s1: float) -> float:
        lse = math.log(math.exp(s0) + math.exp(s1))
        return -(w0 * (s0 - lse) + w1 * (s1 - lse))

    expected = 0.5 * (ce(a, c) + ce(a + b, c))
    got = naive_gnivo_loss(logp, old, mask, rewards, 2, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # Sequence units: only the last token of each row is a boundary, T_g = 1.
    got_sequence = naive_gnivo_loss(logp, old, mask, rewards, 2, alpha, boundaries=torch.zeros(2, 2, dtype=torch.bool))
    assert float(got_sequence) == pytest.approx(ce(a + b, c), rel=1e-12)
    # "none" weights: w_i = exp(R_i/alpha)/K.
    w0, w1 = math.exp(2.0) / 2, 0.5
    got_none = naive_gnivo_loss(logp, old, mask, rewards, 2, alpha, weight_normalization="none")
    assert float(got_none) == pytest.approx(0.5 * (ce(a, c) + ce(a + b, c)), rel=1e-12)


def test_unit_boundaries_follow_spec_rules():
    # Step boundaries are AND'ed with the mask; the last unmasked token always closes a unit; masked rows have none.
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    proposed = torch.tensor(
        [[False, True, False, False, True], [True, True, False, False, False], [True, True, True, True, True]]
    )
    for boundaries in (None, proposed, torch.zeros_like(proposed)):
        got = unit_boundaries(mask, boundaries)
        for i in range(mask.size(0)):
            row_b = None if boundaries is None else boundaries[i].tolist()
            expected = naive_boundary_positions([bool(m) for m in mask[i].tolist()], row_b)
            assert torch.nonzero(got[i]).flatten().tolist() == expected


@pytest.mark.parametrize("units", ["token", "step", "sequence"])
@pytest.mark.parametrize("seed", range(4))
def test_prefix_log_ratios_equal_naive_prefix_sums_held_past_row_end(units, seed):
    logp, old, mask, _, boundaries = make_case(seed, 4, units)
    got = prefix_log_ratios(logp.float(), old.float(), mask.float(), boundaries)
    B, T = mask.shape
    for i in range(B):
        b_row = None if boundaries is None else boundaries[i].tolist()
        closes = naive_boundary_positions([bool(m) for m in mask[i].tolist()], b_row)
        assert int(got.num_units[i]) == len(closes)
        expected = [sum(float(logp[i, s] - old[i, s]) for s in range(b + 1) if mask[i, s]) for b in closes]
        held = expected[-1] if expected else 0.0
        expected += [held] * (got.values.size(1) - len(expected))
        torch.testing.assert_close(
            got.values[i].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0
        )


# ----------------------------------------------------------------------------------------------------------------------
# 2. gnivo_loss == naive reference (values and gradients), docs/algorithms.md#tested-against-naive
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 1.0])
@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
@pytest.mark.parametrize("units", ["token", "step", "sequence"])
@pytest.mark.parametrize("K", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_gnivo_loss_value_and_gradient_equal_naive_float64(seed, K, units, weight_normalization, alpha):
    case = make_case(seed, K, units, nan_rewards=(seed == 2))
    loss, grad = run_library(*case[:4], K, alpha, case[4], weight_normalization)
    ref_loss, ref_grad = run_naive(*case[:4], K, alpha, case[4], weight_normalization)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad)


@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
@pytest.mark.parametrize("units", ["token", "step", "sequence"])
@pytest.mark.parametrize("seed", range(3))
def test_gnivo_loss_ignores_garbage_at_masked_positions(seed, units, weight_normalization):
    K = 4
    logp, old, mask, rewards, boundaries = make_case(seed, K, units)
    clean_loss, clean_grad = run_library(logp, old, mask, rewards, K, 0.2, boundaries, weight_normalization)
    for logp_fill, old_fill in [(-math.inf, -math.inf), (1e30, -1e30), (math.nan, math.inf), (-1e4, 3e4)]:
        dirty_logp = fill_masked(logp, mask, logp_fill)
        dirty_old = fill_masked(old, mask, old_fill)
        loss, grad = run_library(dirty_logp, dirty_old, mask, rewards, K, 0.2, boundaries, weight_normalization)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
        torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)
        assert (grad[~mask.bool()] == 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# 3. Properties
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
@pytest.mark.parametrize("units", ["token", "step", "sequence"])
@pytest.mark.parametrize("K", [2, 4, 8])
def test_all_equal_rewards_give_zero_gradient_at_unmoved_policy(K, units, weight_normalization):
    logp, _, mask, _, boundaries = make_case(3, K, units)
    rewards = torch.full((mask.size(0),), 0.7, dtype=torch.float64)
    loss, grad = run_library(logp, logp, mask, rewards, K, 0.2, boundaries, weight_normalization)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    # Zero up to float32 rounding of the weights (the "none" weights are exp(0.7/0.2)/K ~ 33/K, not 1).
    weight_scale = max(1.0, float(group_weights(rewards.float(), K, 0.2, weight_normalization).weights.max()))
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6 * weight_scale)


@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
@pytest.mark.parametrize("units", ["token", "step"])
@pytest.mark.parametrize("seed", range(3))
def test_nan_reward_row_gets_no_gradient_and_nothing_is_nan(seed, units, weight_normalization):
    K = 4
    logp, old, mask, rewards, boundaries = make_case(seed, K, units, n_groups=2)
    rewards[1] = float("nan")
    rewards[K + 2] = float("nan")
    loss, grad = run_library(logp, old, mask, rewards, K, 0.2, boundaries, weight_normalization)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    assert (grad[1] == 0).all() and (grad[K + 2] == 0).all()
    # The other rows of those groups still learn.
    assert grad[0].abs().sum() > 0


@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
@pytest.mark.parametrize("units", ["token", "step", "sequence"])
def test_nan_reward_row_is_equivalent_to_removing_it_from_its_group(units, weight_normalization):
    # One group of K=3 with a NaN row == the group of K=2 made of the other two rows (weights, softmax normaliser,
    # K in the "none" weights and the group horizon T_g all ignore the removed row). The removed row is the longest,
    # so T_g must be computed over members only.
    logp, old, mask, rewards, boundaries = make_case(5, 3, units, n_groups=1)
    mask[:] = 0.0
    mask[0, :2] = 1.0
    mask[1, :3] = 1.0
    mask[2, :] = 1.0
    assert mask[2].sum() > mask[1].sum()
    rewards[2] = float("nan")
    keep = [0, 1]
    sub_boundaries = None if boundaries is None else boundaries[keep]
    for alpha in (0.2, 1.0):
        loss, grad = run_library(logp, old, mask, rewards, 3, alpha, boundaries, weight_normalization)
        sub_loss, sub_grad = run_library(
            logp[keep], old[keep], mask[keep], rewards[keep], 2, alpha, sub_boundaries, weight_normalization
        )
        torch.testing.assert_close(loss, sub_loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad[keep], sub_grad, rtol=1e-6, atol=1e-7)
        assert (grad[2] == 0).all()


@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
def test_all_nan_group_gives_zero_loss_and_finite_gradients(weight_normalization):
    K = 3
    logp, old, mask, rewards, _ = make_case(1, K, "token", n_groups=2)
    rewards[:K] = float("nan")
    loss, grad = run_library(logp, old, mask, rewards, K, 0.2, None, weight_normalization)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[:K] == 0).all()
    # The dead group contributes L_g = 0 to the mean over the 2 groups.
    other_loss, _ = run_library(logp[K:], old[K:], mask[K:], rewards[K:], K, 0.2, None, weight_normalization)
    torch.testing.assert_close(loss, other_loss / 2, rtol=1e-6, atol=1e-7)
    # A batch made only of dead groups: loss exactly 0.
    rewards[:] = float("nan")
    loss, grad = run_library(logp, old, mask, rewards, K, 0.2, None, weight_normalization)
    assert loss.item() == 0.0 and torch.isfinite(grad).all() and (grad == 0).all()


def test_none_weights_refuse_rewards_whose_exp_overflows_float32():
    logp, old, mask, _, _ = make_case(0, 2, "token", n_groups=1)
    rewards = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha"):
        run_library(logp, old, mask, rewards, 2, 1.0 / 88.9, None, "none")  # R/alpha = 88.9
    with pytest.raises(ValueError, match="alpha"):
        run_library(logp, old, mask, rewards * 100.0, 2, 1.0, None, "none")
    # exp(88) still fits float32, but the loss (weights times summed -log q) would overflow: refused too.
    with pytest.raises(ValueError, match="alpha"):
        group_weights((rewards * 88.0).float(), 2, 1.0, "none")
    # At the accepted limit the weights are finite.
    weights = group_weights((rewards * 60.0).float(), 2, 1.0, "none")
    assert torch.isfinite(weights.weights).all() and torch.isfinite(weights.weight_sum).all()
    # The softmax weights are scale-free: huge R/alpha is fine there.
    loss, grad = run_library(logp, old, mask, rewards * 1e4, 2, 1.0, None, "softmax")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("num_tokens", [10, 4096])
def test_none_weights_accepted_rewards_do_not_overflow_the_loss(num_tokens):
    # R/alpha = 60, the largest accepted; the policy moved a lot (50 nats per token on one row): loss and gradient
    # must stay finite over thousands of prefixes.
    logp = torch.full((2, num_tokens), -1.0, requires_grad=True)
    old = torch.full((2, num_tokens), -1.0)
    old[1] = 49.0
    rewards = torch.tensor([0.0, 60.0])
    loss = gnivo_loss(logp, old, torch.ones(2, num_tokens), rewards, 2, 1.0, weight_normalization="none")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


@pytest.mark.parametrize("alpha", [0.0, -0.2])
@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
def test_non_positive_alpha_is_refused(alpha, weight_normalization):
    logp, old, mask, rewards, _ = make_case(0, 2, "token", n_groups=1)
    with pytest.raises(ValueError, match="alpha"):
        run_library(logp, old, mask, rewards, 2, alpha, None, weight_normalization)


@pytest.mark.parametrize("units", ["token", "step"])
def test_bf16_logp_gives_float32_loss_equal_to_float32_computation(units):
    K = 4
    logp, old, mask, rewards, boundaries = make_case(2, K, units, n_groups=3)
    logp_bf16 = logp.to(torch.bfloat16).requires_grad_(True)
    loss = gnivo_loss(logp_bf16, old.float(), mask.float(), rewards.float(), K, 0.2, boundaries)
    assert loss.dtype == torch.float32
    (grad_bf16,) = torch.autograd.grad(loss, logp_bf16)
    assert grad_bf16.dtype == torch.bfloat16 and torch.isfinite(grad_bf16.float()).all()
    # Upcast first, then the float32 path: the same numbers (all arithmetic runs in float32 either way).
    logp_f32 = logp.to(torch.bfloat16).float().requires_grad_(True)
    loss_f32 = gnivo_loss(logp_f32, old.float(), mask.float(), rewards.float(), K, 0.2, boundaries)
    (grad_f32,) = torch.autograd.grad(loss_f32, logp_f32)
    torch.testing.assert_close(loss, loss_f32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_bf16.float(), grad_f32.to(torch.bfloat16).float(), rtol=0, atol=0)
    # And within bf16 rounding of the unrounded float32 computation.
    loss_exact = gnivo_loss(logp.float(), old.float(), mask.float(), rewards.float(), K, 0.2, boundaries)
    torch.testing.assert_close(loss, loss_exact, rtol=2e-2, atol=2e-2)


def test_bf16_long_sequence_cumsum_runs_in_float32():
    # 4096 tokens of log-ratio 1/256 each (exact in bf16): S(T) = 16 exactly in float32; a bf16 cumsum would stall
    # long before (bf16 has 8 significant bits).
    T = 4096
    logp = torch.full((2, T), -1.0 + 1.0 / 256, dtype=torch.bfloat16)
    old = torch.full((2, T), -1.0, dtype=torch.bfloat16)
    mask = torch.ones(2, T)
    mask[1] = 0.0
    prefix = prefix_log_ratios(logp, old, mask, torch.zeros(2, T, dtype=torch.bool))
    assert prefix.values.dtype == torch.float32
    assert float(prefix.values[0, 0]) == pytest.approx(16.0, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Gradient identity and the linearised (micro-batch) row loss
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
@pytest.mark.parametrize("units", ["token", "step", "sequence"])
@pytest.mark.parametrize("K", [2, 3, 8])
def test_group_loss_gradient_identity_holds_for_arbitrary_prefix_values(K, units, weight_normalization):
    # dL_g/dS_i(t) = (q_i(t) * sum_j w_j - w_i) / T_g for t <= T_g, 0 past T_g, with q(t) = softmax_members(S(t)).
    logp, old, mask, rewards, boundaries = make_case(4, K, units, n_groups=2, nan_rewards=True)
    prefix = prefix_log_ratios(logp.float(), old.float(), mask.float(), boundaries)
    S = prefix.values.detach().clone().requires_grad_(True)
    weights = group_weights(rewards.float(), K, 0.2, weight_normalization)
    group_losses = gnivo_group_losses(S, prefix.num_units, weights, K)
    (grad,) = torch.autograd.grad(group_losses.sum(), S)
    B, U = S.shape
    expected = torch.zeros(B, U, dtype=torch.float64)
    for g in range(B // K):
        rows = list(range(g * K, (g + 1) * K))
        members = [i for i in rows if bool(weights.member[i])]
        horizon = max(int(prefix.num_units[i]) for i in members)
        w_sum = sum(float(weights.weights[i]) for i in members)
        for t in range(min(horizon, U)):
            column = torch.tensor([float(S.detach()[i, t]) for i in members], dtype=torch.float64)
            q = torch.softmax(column, dim=0)
            for k, i in enumerate(members):
                expected[i, t] = (float(q[k]) * w_sum - float(weights.weights[i])) / horizon
    assert_grad_close(grad, expected)


def group_quantities(rewards, mask, boundaries, K, alpha, weight_normalization):
    """What a trainer knows at generation time: per-row weights and group sizes, and T_g = max n_i over members."""
    weights = group_weights(rewards.float(), K, alpha, weight_normalization)
    num_units = prefix_log_ratios(torch.zeros(mask.shape), torch.zeros(mask.shape), mask.float(), boundaries).num_units
    member_units = torch.where(weights.member, num_units, 0).reshape(-1, K)
    horizon = member_units.amax(dim=1, keepdim=True).expand(-1, K).reshape(-1)
    return weights, horizon


def linearized_rows(logp, old, mask, boundaries, weights, horizon, rows):
    rows = torch.as_tensor(rows, dtype=torch.long)
    return gnivo_linearized_row_loss(
        logp[rows],
        old[rows],
        mask[rows],
        None if boundaries is None else boundaries[rows],
        weights.weights[rows],
        weights.member[rows],
        weights.weight_sum[rows],
        weights.group_size[rows],
        horizon[rows],
    )


@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
@pytest.mark.parametrize("units", ["token", "sequence"])
def test_a_group_whose_completions_are_all_masked_has_zero_loss_in_both_forms(units, weight_normalization):
    """Every completion of a group truncated and masked (mask_truncated_completions): no unit, T_g = 0, so the exact
    L_g is 0, and the linearised rows (groups split over micro-batches) must give 0 too, not sum_i w_i log K_g."""
    K = 4
    logp64, _, mask, rewards, boundaries = make_case(2, K, units, n_groups=2)
    mask[:K] = 0.0
    weights, horizon = group_quantities(rewards, mask, boundaries, K, 0.2, weight_normalization)
    assert (horizon[:K] == 0).all() and weights.member[:K].all()  # still members, with rewards
    logp = logp64.float()
    prefix = prefix_log_ratios(logp, logp, mask.float(), boundaries)
    exact = gnivo_group_losses(prefix.values, prefix.num_units, weights, K)
    linear = linearized_rows(logp, logp, mask.float(), boundaries, weights, horizon, range(2 * K))
    assert exact[0].item() == 0.0 and (linear[:K] == 0).all()
    torch.testing.assert_close(linear.reshape(2, K).sum(dim=1), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
@pytest.mark.parametrize("units", ["token", "step", "sequence"])
@pytest.mark.parametrize("K", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(2))
def test_linearized_row_loss_equals_gnivo_loss_at_unmoved_policy(seed, K, units, weight_normalization, alpha):
    # With old_logp = logp.detach(): mean over groups of the per-group sum of row losses == gnivo_loss, in value and
    # in gradient w.r.t. logp; also equal to the naive reference's gradient.
    logp64, _, mask, rewards, boundaries = make_case(seed, K, units, nan_rewards=(seed == 1))
    B = mask.size(0)
    n_groups = B // K
    weights, horizon = group_quantities(rewards, mask, boundaries, K, alpha, weight_normalization)

    logp = logp64.float().requires_grad_(True)
    full = gnivo_loss(logp, logp.detach(), mask.float(), rewards.float(), K, alpha, boundaries, weight_normalization)
    (full_grad,) = torch.autograd.grad(full, logp)

    logp_lin = logp64.float().requires_grad_(True)
    row_losses = linearized_rows(logp_lin, logp_lin.detach(), mask.float(), boundaries, weights, horizon, range(B))
    assert row_losses.shape == (B,)
    assert (row_losses[~weights.member] == 0).all()
    lin = row_losses.reshape(n_groups, K).sum(dim=1).mean()
    (lin_grad,) = torch.autograd.grad(lin, logp_lin)

    torch.testing.assert_close(lin, full, rtol=1e-5, atol=1e-6)
    assert_grad_close(lin_grad.double(), full_grad.double())
    _, ref_grad = run_naive(logp64, logp64, mask, rewards, K, alpha, boundaries, weight_normalization)
    assert_grad_close(lin_grad, ref_grad)


@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
@pytest.mark.parametrize("units", ["token", "step", "sequence"])
@pytest.mark.parametrize("seed", range(4))
def test_linearized_row_loss_gradient_is_layout_independent_over_micro_batches(seed, units, weight_normalization):
    # Split the rows into a random subset and its complement (two micro-batches that cut through groups), compute
    # the row losses of each separately, sum the gradients: it equals gnivo_loss's gradient on the whole batch.
    K = 4
    logp64, _, mask, rewards, boundaries = make_case(seed, K, units, n_groups=3, nan_rewards=(seed % 2 == 1))
    B = mask.size(0)
    n_groups = B // K
    weights, horizon = group_quantities(rewards, mask, boundaries, K, 0.2, weight_normalization)

    logp = logp64.float().requires_grad_(True)
    full = gnivo_loss(logp, logp.detach(), mask.float(), rewards.float(), K, 0.2, boundaries, weight_normalization)
    (full_grad,) = torch.autograd.grad(full, logp)

    perm = torch.randperm(B, generator=torch.Generator().manual_seed(100 + seed))
    n_first = int(torch.randint(1, B, (1,), generator=torch.Generator().manual_seed(200 + seed)))
    total_grad = torch.zeros(B, mask.size(1))
    total_value = 0.0
    for part in (perm[:n_first], perm[n_first:]):
        part_logp = logp64[part].float().requires_grad_(True)
        sub_boundaries = None if boundaries is None else boundaries[part]
        part_weights = type(weights)(*(field[part] for field in weights))
        part_loss = (
            gnivo_linearized_row_loss(
                part_logp,
                part_logp.detach(),
                mask[part].float(),
                sub_boundaries,
                part_weights.weights,
                part_weights.member,
                part_weights.weight_sum,
                part_weights.group_size,
                horizon[part],
            ).sum()
            / n_groups  # each micro-batch normalises by the global number of groups
        )
        (part_grad,) = torch.autograd.grad(part_loss, part_logp)
        total_grad[part] += part_grad
        total_value += part_loss.item()
    assert total_value == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    assert_grad_close(total_grad.double(), full_grad.double())


@pytest.mark.parametrize("units", ["token", "step"])
def test_at_the_sampling_policy_unit_k_is_weighted_by_the_prefixes_that_contain_it(units):
    """At the sampling policy (all prefix log-ratios 0), a token in unit ``k`` (1-based) of row ``i`` gets the
    gradient ``(T_g - k + 1) / T_g * (1/K_g - w_i) / num_groups``: the later a unit, the fewer of the ``T_g`` prefixes
    contain it, so with token units the last tokens of a completion (where the answer is) get ``~1/T_g`` of the
    first token's weight. This is the loss's own property (it explains token units' slow finish in
    ``benchmarks/results/fair_comparison/learning.md``), checked here against the closed form."""
    generator = torch.Generator().manual_seed(3)
    K, T = 4, 9
    mask = torch.ones(2 * K, T)
    mask[1, 6:] = 0  # rows of different lengths
    mask[5, 3:] = 0
    boundaries = None if units == "token" else (torch.rand(2 * K, T, generator=generator) < 0.4)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    alpha = 0.5
    logp = torch.randn(2 * K, T, generator=generator, dtype=torch.float64).requires_grad_()
    gnivo_loss(logp, logp.detach(), mask, rewards, K, alpha, boundaries).backward()

    weights = torch.softmax(rewards.view(2, K) / alpha, dim=1).reshape(-1)
    expected = torch.zeros(2 * K, T, dtype=torch.float64)
    unit_counts = []
    for row in range(2 * K):
        ends = naive_boundary_positions(
            mask[row].bool().tolist(), None if boundaries is None else boundaries[row].tolist()
        )
        unit_counts.append(len(ends))
    for row in range(2 * K):
        group = row // K
        T_g = max(unit_counts[group * K : (group + 1) * K])
        ends = naive_boundary_positions(
            mask[row].bool().tolist(), None if boundaries is None else boundaries[row].tolist()
        )
        for position in range(T):
            if not mask[row, position]:
                continue
            k = next(index for index, end in enumerate(ends, start=1) if end >= position)
            expected[row, position] = (T_g - k + 1) / T_g * (1 / K - weights[row].item()) / 2
    torch.testing.assert_close(logp.grad, expected, rtol=1e-5, atol=1e-7)
    first, last = expected[0, 0].item(), expected[0, T - 1].item()
    assert abs(last) < abs(first) / 2  # the last unit of the longest row is the least weighted
