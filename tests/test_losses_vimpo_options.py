"""Options of the official VIMPO implementation (Huber value loss, value-loss normaliser, ``vimpo_cap_v0``, candidate-set
KL, soft value) against naive float64 loop implementations.

Every reference below is written from the official semantics as stated in the functions' docstrings (explicit Python
loops over rows, token positions and vocabulary entries, in float64), not from ``gnivo_trl.losses``. The float32
implementations must agree with them in value and, where differentiable, in gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from gnivo_trl.losses import (
    candidate_set_kl_from_log_probs,
    candidate_set_token_kl,
    exact_token_kl,
    group_centered_rewards,
    soft_value_baselines,
    soft_vimpo_residuals,
    soft_vimpo_value_loss,
    vimpo_reward_baselines,
    vimpo_value_loss,
    vimpo_value_loss_from_residuals,
    vimpo_value_loss_norm_denom,
)

# ----------------------------------------------------------------------------------------------------------------------
# Naive float64 references
# ----------------------------------------------------------------------------------------------------------------------


def naive_row_loss(residual, loss_type: str, delta: float):
    """``0.5 r^2``, or Huber: ``0.5 r^2`` for ``|r| <= delta`` and ``delta * (|r| - delta / 2)`` beyond.

    ``residual`` may be a Python float or a float64 0-d tensor (then gradients flow through it).
    """
    if loss_type == "squared_error":
        return 0.5 * residual * residual
    plain = float(residual.detach()) if torch.is_tensor(residual) else float(residual)
    if abs(plain) <= delta:
        return 0.5 * residual * residual
    sign = 1.0 if plain > 0 else -1.0
    return delta * (sign * residual - 0.5 * delta)


def naive_group_mean(values: list[float], K: int) -> list[float]:
    """Per row, the mean of its group's non-NaN values (NaN for a group without any)."""
    out = []
    for g in range(len(values) // K):
        members = [v for v in values[g * K : (g + 1) * K] if not math.isnan(v)]
        out.extend([sum(members) / len(members) if members else math.nan] * K)
    return out


def naive_capped_baselines(values: list[float], K: int, cap: float | None) -> list[float]:
    means = naive_group_mean(values, K)
    if cap is None:
        return means
    return [m if math.isnan(m) else min(m, cap) for m in means]


def naive_raw_value_loss(logp64, ref_logp, token_kl, mask, rewards, K, beta, loss_type, delta):
    """``mean_i loss(sum_s mask * beta * (logp - ref - KL) - (R_i - mean_g R))``; NaN-reward rows add 0."""
    B, T = mask.shape
    reward_list = [float(r) for r in rewards]
    means = naive_group_mean(reward_list, K)
    ref_rows, kl_rows, mask_rows = ref_logp.tolist(), token_kl.tolist(), mask.tolist()
    total = logp64.new_zeros(())
    for i in range(B):
        if math.isnan(reward_list[i]):
            continue
        value = logp64.new_zeros(())
        for s in range(T):
            if mask_rows[i][s]:
                value = value + beta * (logp64[i, s] - ref_rows[i][s] - kl_rows[i][s])
        total = total + naive_row_loss(value - (reward_list[i] - means[i]), loss_type, delta)
    return total / B


def naive_soft_value_loss(logp64, ref_logp, mask, rewards, baselines, beta, loss_type, delta):
    """``mean_i loss(beta * sum_s mask * (logp - ref) - (R_i - V0_i))``; NaN-reward rows add 0."""
    B, T = mask.shape
    reward_list = [float(r) for r in rewards]
    base_list = [float(b) for b in baselines]
    ref_rows, mask_rows = ref_logp.tolist(), mask.tolist()
    total = logp64.new_zeros(())
    for i in range(B):
        if math.isnan(reward_list[i]):
            continue
        prediction = logp64.new_zeros(())
        for s in range(T):
            if mask_rows[i][s]:
                prediction = prediction + beta * (logp64[i, s] - ref_rows[i][s])
        total = total + naive_row_loss(prediction - (reward_list[i] - base_list[i]), loss_type, delta)
    return total / B


def naive_log_softmax_row(row, temperature: float):
    """Float64 log-softmax of one row of logits (a float64 tensor, gradients flow) divided by the temperature."""
    scaled = [row[v] / temperature for v in range(row.numel())]
    top = max(x.item() for x in scaled)  # a constant shift: log Z = top + log sum_v exp(x_v - top)
    log_z = top + torch.log(sum(torch.exp(x - top) for x in scaled))
    return [x - log_z for x in scaled]


def naive_candidate_kl(policy_logits64, ref_logits, topk: int, temperature: float):
    """Per row: the ``min(topk, V)`` tokens of largest policy probability, ``sum p (log p - log q)`` over them with
    ``p`` and ``q`` normalised over the whole vocabulary (no renormalisation, no sampled token added)."""
    N, V = policy_logits64.shape
    out = []
    for n in range(N):
        log_p = naive_log_softmax_row(policy_logits64[n], temperature)
        log_q = [x.item() for x in naive_log_softmax_row(ref_logits[n].double(), temperature)]
        order = sorted(range(V), key=lambda v: -log_p[v].item())
        total = policy_logits64.new_zeros(())
        for v in order[: min(topk, V)]:
            total = total + torch.exp(log_p[v]) * (log_p[v] - log_q[v])
        out.append(total)
    return torch.stack(out)


def ragged_mask(B: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of different lengths, a hole in one row (tool output), one fully masked row."""
    mask = torch.zeros(B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    for i in range(B):
        mask[i, : int(lengths[i])] = 1.0
    mask[0] = 1.0
    mask[0, T // 3 : T // 3 + 2] = 0.0
    mask[B - 1] = 0.0
    return mask


def batch(B=8, T=7, K=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3 * scale
    ref = -torch.rand(B, T, generator=g) * 3 * scale
    kl = torch.rand(B, T, generator=g) * 0.5
    mask = ragged_mask(B, T, g)
    rewards = torch.randint(0, 2, (B,), generator=g).float() + 0.1 * torch.randn(B, generator=g)
    return logp, ref, kl, mask, rewards, K


def float_grad(fn, logp):
    leaf = logp.clone().requires_grad_(True)
    value = fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


# ----------------------------------------------------------------------------------------------------------------------
# Value loss type (vimpo_value_loss_type / vimpo_value_huber_delta)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["squared_error", "huber"])
@pytest.mark.parametrize("delta", [0.005, 0.5, 1.0])
def test_row_loss_values_and_gradients_match_naive(loss_type, delta):
    residuals = torch.tensor([-3.0, -1.0, -0.5, -0.004, 0.0, 0.003, 0.2, 0.5, 0.7, 2.5], dtype=torch.float32)
    leaf = residuals.clone().requires_grad_(True)
    loss = vimpo_value_loss_from_residuals(leaf, loss_type, delta)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == residuals.shape
    for r, value, grad in zip(residuals.tolist(), loss.tolist(), leaf.grad.tolist(), strict=True):
        r64 = torch.tensor(r, dtype=torch.float64, requires_grad=True)
        expected = naive_row_loss(r64, loss_type, delta)
        expected.backward()
        assert value == pytest.approx(expected.item(), rel=1e-6, abs=1e-9)
        assert grad == pytest.approx(float(r64.grad), rel=1e-6, abs=1e-9)


def test_huber_is_continuous_with_gradient_clamped_at_delta():
    delta = 0.5
    residuals = torch.tensor([-10.0, -delta, delta, 10.0], requires_grad=True)
    loss = vimpo_value_loss_from_residuals(residuals, "huber", delta)
    loss.sum().backward()
    # At |r| = delta both pieces give 0.5 delta^2; beyond it the slope is delta, not 1 (not smooth_l1).
    assert loss.tolist() == pytest.approx([delta * (10 - delta / 2), 0.5 * delta**2, 0.5 * delta**2, 4.875])
    assert residuals.grad.tolist() == pytest.approx([-delta, -delta, delta, delta])


def test_row_loss_rejects_unknown_type_and_nonpositive_delta():
    r = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        vimpo_value_loss_from_residuals(r, "l1", 1.0)
    for delta in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="huber_delta"):
            vimpo_value_loss_from_residuals(r, "huber", delta)
    # The official code checks the delta whatever the loss type is.
    with pytest.raises(ValueError, match="huber_delta"):
        vimpo_value_loss_from_residuals(r, "squared_error", 0.0)


def test_vimpo_value_loss_default_is_unchanged():
    logp, ref, kl, mask, rewards, K = batch(seed=1)
    rewards[3] = math.nan
    default = vimpo_value_loss(logp, ref, kl, mask, rewards, K, 0.3)
    explicit = vimpo_value_loss(logp, ref, kl, mask, rewards, K, 0.3, loss_type="squared_error", huber_delta=7.0)
    assert torch.equal(default, explicit)
    expected = naive_raw_value_loss(logp.double(), ref, kl, mask, rewards, K, 0.3, "squared_error", 1.0)
    assert float(default) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("delta", [0.005, 0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vimpo_value_loss_huber_matches_naive_values_and_gradients(delta, seed):
    logp, ref, kl, mask, rewards, K = batch(seed=seed)
    rewards[2] = math.nan  # a row without a reward: contributes 0, still counts in B
    beta = 0.2

    value, grad = float_grad(
        lambda lp: vimpo_value_loss(lp, ref, kl, mask, rewards, K, beta, loss_type="huber", huber_delta=delta), logp
    )
    logp64 = logp.double().requires_grad_(True)
    expected = naive_raw_value_loss(logp64, ref, kl, mask, rewards, K, beta, "huber", delta)
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5, abs=1e-8)
    torch.testing.assert_close(grad, logp64.grad.float(), rtol=1e-5, atol=1e-7)
    assert torch.all(grad[mask == 0] == 0)
    assert torch.all(grad[2] == 0)
    if delta == 0.5:  # rows on both sides of delta in one batch: neither branch is tested vacuously
        means = naive_group_mean(rewards.tolist(), K)
        residuals = [
            sum(beta * (logp[i, s] - ref[i, s] - kl[i, s]).item() for s in range(mask.size(1)) if mask[i, s])
            - (rewards[i].item() - means[i])
            for i in range(len(rewards))
            if not math.isnan(rewards[i].item())
        ]
        assert any(abs(r) > delta for r in residuals) and any(abs(r) <= delta for r in residuals)


def test_norm_denom_matches_naive_mean_square():
    targets = torch.tensor([0.5, -1.5, math.nan, 2.0, 0.0])
    finite = [t for t in targets.tolist() if not math.isnan(t)]
    expected = sum(t * t for t in finite) / len(finite)
    assert float(vimpo_value_loss_norm_denom(targets)) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(float(vimpo_value_loss_norm_denom(torch.full((3,), math.nan))))


# ----------------------------------------------------------------------------------------------------------------------
# vimpo_cap_v0 on the raw baseline
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [None, -0.2, 0.3, 5.0])
def test_reward_baselines_match_naive(cap):
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(12, generator=g)
    rewards[1] = math.nan
    rewards[8:12] = math.nan  # a group without any reward
    got = vimpo_reward_baselines(rewards, 4, cap)
    expected = naive_capped_baselines(rewards.tolist(), 4, cap)
    assert got.dtype == torch.float32 and got.shape == (12,)
    for a, b in zip(got.tolist(), expected, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-7)


def test_uncapped_reward_baseline_gives_group_centred_target():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.5])
    torch.testing.assert_close(rewards - vimpo_reward_baselines(rewards, 3), group_centered_rewards(rewards, 3))


def test_cap_only_caps_from_above():
    # Two prompts: mean 1.0 is capped to 0.5, mean -1.0 stays (the cap never raises a baseline).
    rewards = torch.tensor([2.0, 0.0, -1.0, -1.0])
    assert vimpo_reward_baselines(rewards, 2, cap_v0=0.5).tolist() == [0.5, 0.5, -1.0, -1.0]


# ----------------------------------------------------------------------------------------------------------------------
# Candidate-set KL
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 3, 8])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_candidate_set_kl_matches_naive_values_and_gradients(topk, temperature):
    g = torch.Generator().manual_seed(5)
    N, V = 6, 11
    policy = torch.randn(N, V, generator=g) * 2
    ref = policy + 0.8 * torch.randn(N, V, generator=g)

    leaf = policy.clone().requires_grad_(True)
    got = candidate_set_token_kl(leaf, ref, topk, temperature)
    got.sum().backward()
    assert got.dtype == torch.float32 and got.shape == (N,)

    policy64 = policy.double().requires_grad_(True)
    expected = naive_candidate_kl(policy64, ref, topk, temperature)
    expected.sum().backward()
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, policy64.grad.float(), rtol=1e-4, atol=1e-6)


def test_candidate_set_kl_from_log_probs_agrees_with_logits_version():
    g = torch.Generator().manual_seed(6)
    policy = torch.randn(5, 17, generator=g) * 3
    ref = torch.randn(5, 17, generator=g) * 3
    from_logits = candidate_set_token_kl(policy, ref, 4, temperature=1.3)
    from_log_probs = candidate_set_kl_from_log_probs(
        torch.log_softmax(policy / 1.3, dim=-1), torch.log_softmax(ref / 1.3, dim=-1), 4
    )
    torch.testing.assert_close(from_logits, from_log_probs)


def test_candidate_set_kl_with_whole_vocabulary_is_the_exact_kl():
    g = torch.Generator().manual_seed(7)
    policy = torch.randn(4, 9, generator=g)
    ref = torch.randn(4, 9, generator=g)
    exact = exact_token_kl(policy, ref, temperature=0.9)
    torch.testing.assert_close(candidate_set_token_kl(policy, ref, 9, 0.9), exact)
    torch.testing.assert_close(candidate_set_token_kl(policy, ref, 1000, 0.9), exact)  # k = min(topk, V)


def test_candidate_set_kl_is_not_renormalised_and_can_be_negative():
    # The reference puts more mass than the policy on the policy's top token: its single-candidate term is
    # p (log p - log q) < 0, while the exact KL is > 0. A renormalised candidate set would give exactly 0.
    policy = torch.tensor([[2.0, 1.0, 1.0, 1.0]])
    ref = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(policy, -1)[0, 0]
    q = torch.softmax(ref, -1)[0, 0]
    got = candidate_set_token_kl(policy, ref, 1)
    assert float(got) == pytest.approx(float(p * (p.log() - q.log())), rel=1e-6)
    assert float(got) < 0 < float(exact_token_kl(policy, ref))


def test_candidate_set_uses_policy_top_k_not_the_reference_or_the_sampled_token():
    # Token 3 is the reference's favourite and token 0 the policy's; with k=1 only token 0 counts.
    policy = torch.tensor([[3.0, 0.0, 0.0, -1.0]])
    ref = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    log_p, log_q = torch.log_softmax(policy, -1)[0], torch.log_softmax(ref, -1)[0]
    expected = log_p[0].exp() * (log_p[0] - log_q[0])
    assert float(candidate_set_token_kl(policy, ref, 1)) == pytest.approx(float(expected), rel=1e-6)


def test_candidate_set_kl_rejects_nonpositive_topk_and_bad_shapes():
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="topk"):
        candidate_set_token_kl(x, x, 0)
    with pytest.raises(ValueError, match="shape"):
        candidate_set_kl_from_log_probs(x, torch.zeros(2, 4), 2)


# ----------------------------------------------------------------------------------------------------------------------
# Soft value (value_type="soft")
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [None, 0.0, 0.4])
def test_soft_value_baselines_match_naive(cap):
    g = torch.Generator().manual_seed(8)
    B, K, beta = 8, 4, 0.05
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    rewards[5] = math.nan
    kl_sums = torch.rand(B, generator=g) * 20
    got = soft_value_baselines(rewards, kl_sums, K, beta, cap)
    soft_returns = [r - beta * k for r, k in zip(rewards.tolist(), kl_sums.tolist(), strict=True)]
    expected = naive_capped_baselines(soft_returns, K, cap)
    assert got.dtype == torch.float32 and not got.requires_grad
    for a, b in zip(got.tolist(), expected, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)


def test_soft_value_baselines_reject_mismatched_kl_sums():
    with pytest.raises(ValueError, match="old_token_kl_sums"):
        soft_value_baselines(torch.zeros(4), torch.zeros(3), 2, 0.1)


@pytest.mark.parametrize("loss_type", ["squared_error", "huber"])
@pytest.mark.parametrize("seed", [0, 1])
def test_soft_value_loss_matches_naive_values_and_gradients(loss_type, seed):
    logp, ref, kl, mask, rewards, K = batch(seed=seed)
    rewards[6] = math.nan
    beta, delta = 0.1, 0.3
    kl_sums = (kl * mask).sum(dim=1)
    baselines = soft_value_baselines(rewards, kl_sums, K, beta, cap_v0=0.6)

    value, grad = float_grad(
        lambda lp: soft_vimpo_value_loss(lp, ref, mask, rewards, baselines, beta, loss_type, delta), logp
    )
    logp64 = logp.double().requires_grad_(True)
    expected = naive_soft_value_loss(logp64, ref, mask, rewards, baselines, beta, loss_type, delta)
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-5, abs=1e-8)
    torch.testing.assert_close(grad, logp64.grad.float(), rtol=1e-5, atol=1e-7)
    assert torch.all(grad[mask == 0] == 0) and torch.all(grad[6] == 0)


def test_soft_residual_has_no_kl_term_and_reference_is_constant():
    logp = torch.tensor([[1.0, 0.5]], requires_grad=True)
    ref = torch.tensor([[0.0, 1.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]])
    r = soft_vimpo_residuals(logp, ref, mask, torch.tensor([0.25]), beta=2.0)
    assert r.tolist() == pytest.approx([2.0 * 1.0 - 0.25])
    r.sum().backward()
    assert logp.grad.tolist() == [[2.0, 0.0]] and ref.grad is None


def test_soft_huber_worked_example():
    # One token, logp - ref = 1, beta = 2, R = V0 = 0: residual 2, Huber(delta=0.5) = 0.5 * (2 - 0.25) = 0.875.
    loss = soft_vimpo_value_loss(
        torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1), torch.zeros(1), 2.0, "huber", 0.5
    )
    assert float(loss) == pytest.approx(0.875)
