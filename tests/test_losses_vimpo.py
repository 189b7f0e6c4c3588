"""VIMPO loss mathematics (docs/algorithms.md#vimpo) against naive float64 loop implementations, plus its documented
properties.

Every reference below is written from docs/algorithms.md alone (explicit Python loops over rows and token positions,
in float64), not from ``gnivo_trl.losses``. The float32 implementation must agree with it in value and in gradient
with respect to ``logp`` (docs/algorithms.md#tested-against-naive). The last section checks the zero-mean property of
the token signal ``rho - kappa`` with the exact KL by enumerating the whole vocabulary of a tiny model.
"""

from __future__ import annotations

import math

import pytest
import torch

from gnivo_trl.losses import (
    dual_clip_ppo_loss,
    exact_token_kl,
    group_centered_rewards,
    masked_mean_std,
    token_kl_estimate,
    vimpo_advantages,
    vimpo_value_loss,
    whiten,
)

# ----------------------------------------------------------------------------------------------------------------------
# Naive float64 references (docs/algorithms.md#vimpo), deliberately slow and literal.
# ----------------------------------------------------------------------------------------------------------------------


def naive_group_means(rewards: list[float], K: int) -> list[float]:
    """Per row, the mean reward of its group over the members that have a (non-NaN) reward."""
    means = []
    for g in range(len(rewards) // K):
        members = [r for r in rewards[g * K : (g + 1) * K] if not math.isnan(r)]
        mean = sum(members) / len(members) if members else math.nan
        means.extend([mean] * K)
    return means


def naive_value_loss(logp64, ref_logp, token_kl, mask, rewards, K, beta):
    """``mean_i 0.5 * (sum_s mask * (beta*(logp - ref) - beta*KL) - (R_i - mean_g R))^2``; NaN-reward rows add 0.

    ``logp64`` is a float64 leaf (gradients flow through it); every other input is read as Python floats, so no
    gradient can reach them.
    """
    B, T = mask.shape
    reward_list = [float(r) for r in rewards]
    means = naive_group_means(reward_list, K)
    ref_rows, kl_rows, mask_rows = ref_logp.tolist(), token_kl.tolist(), mask.tolist()
    total = logp64.new_zeros(())
    for i in range(B):
        if math.isnan(reward_list[i]):
            continue
        implied_value = logp64.new_zeros(())
        for s in range(T):
            if mask_rows[i][s]:
                rho = beta * (logp64[i, s] - ref_rows[i][s])
                kappa = beta * kl_rows[i][s]
                implied_value = implied_value + (rho - kappa)
        target = reward_list[i] - means[i]
        total = total + 0.5 * (implied_value - target) ** 2
    return total / B


def naive_advantages(logp, ref_logp, token_kl, mask, beta, gae_lambda):
    """``A[s] = sum_l lambda^l delta[s_l]`` over the unmasked positions ``s_0 = s < s_1 < ...`` of the row (holes in the
    mask are skipped, not a reset), with ``delta = beta*(logp - ref - KL)``; 0 at masked positions."""
    B, T = mask.shape
    lp, ref, kl, m = logp.tolist(), ref_logp.tolist(), token_kl.tolist(), mask.tolist()
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        model_tokens = [s for s in range(T) if m[i][s]]
        for rank, s in enumerate(model_tokens):
            out[i][s] = sum(
                gae_lambda**step * beta * (lp[i][later] - ref[i][later] - kl[i][later])
                for step, later in enumerate(model_tokens[rank:])
            )
    return torch.tensor(out, dtype=torch.float64)


def naive_mean_std(values, mask):
    """Mean and Bessel-corrected std over the valid positions, in float64."""
    valid = [v for v, m in zip(values.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]
    mean = sum(valid) / len(valid)
    variance = sum((v - mean) ** 2 for v in valid) / (len(valid) - 1)
    return mean, math.sqrt(variance)


def naive_dual_clip_token(log_ratio64, advantage, eps_low, eps_high, dual_clip):
    """One token: ``max(-A r, -A clip(r))``, then for ``A < 0`` ``min(that, -A c)``, with explicit branches.

    ``log_ratio64`` is a 0-d float64 tensor carrying the gradient; a branch that selects a constant returns a
    constant (no gradient).
    """
    ratio = torch.exp(log_ratio64)
    r = ratio.item()
    unclipped = -advantage * ratio
    if r < 1.0 - eps_low:
        clipped = log_ratio64.new_tensor(-advantage * (1.0 - eps_low))
    elif r > 1.0 + eps_high:
        clipped = log_ratio64.new_tensor(-advantage * (1.0 + eps_high))
    else:
        clipped = unclipped
    loss = unclipped if unclipped.item() >= clipped.item() else clipped
    if advantage < 0 and loss.item() > -advantage * dual_clip:
        loss = log_ratio64.new_tensor(-advantage * dual_clip)
    return loss


def naive_log_softmax_row(logits_row64: list[float]) -> list[float]:
    m = max(logits_row64)
    log_z = m + math.log(sum(math.exp(x - m) for x in logits_row64))
    return [x - log_z for x in logits_row64]


def naive_kl_and_logps(policy_logits, ref_logits, labels, temperature):
    """Full-softmax float64 KL(pi || pi_ref) per row, and the labels' log-probs under both, row by row."""
    kls, policy_logps, ref_logps = [], [], []
    for n, (p_row, q_row) in enumerate(
        zip(policy_logits.double().tolist(), ref_logits.double().tolist(), strict=True)
    ):
        log_p = naive_log_softmax_row([x / temperature for x in p_row])
        log_q = naive_log_softmax_row([x / temperature for x in q_row])
        kls.append(sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True)))
        if labels is not None:
            policy_logps.append(log_p[int(labels[n])])
            ref_logps.append(log_q[int(labels[n])])
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return as_tensor(kls), as_tensor(policy_logps), as_tensor(ref_logps)


# ----------------------------------------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------------------------------------


def random_mask(B: int, T: int, generator: torch.Generator, holes: bool = False) -> torch.Tensor:
    """Right-padded 0/1 float mask with ragged lengths: row 0 full, row 1 fully masked, the rest random.

    ``holes=True`` also zeroes random positions inside the completions (tool-output tokens).
    """
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[0] = T
    if B > 1:
        lengths[1] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    if holes:
        mask = mask * (torch.rand(B, T, generator=generator) > 0.3).float()
    return mask


def random_token_tensors(B: int, T: int, generator: torch.Generator, mask: torch.Tensor):
    """float32 ``logp``, ``ref_logp``, ``token_kl``; padded positions hold garbage that must never be read."""
    logp = -3.0 * torch.rand(B, T, generator=generator)
    ref_logp = -3.0 * torch.rand(B, T, generator=generator)
    token_kl = 0.5 * torch.rand(B, T, generator=generator)
    padding = mask == 0
    logp = logp.masked_fill(padding, 123.0)
    ref_logp = ref_logp.masked_fill(padding, -456.0)
    token_kl = token_kl.masked_fill(padding, 789.0)
    return logp, ref_logp, token_kl


def random_rewards(B: int, generator: torch.Generator) -> torch.Tensor:
    binary = (torch.rand(B, generator=generator) > 0.5).float()
    continuous = torch.randn(B, generator=generator)
    return torch.where(torch.rand(B, generator=generator) > 0.5, binary, continuous)


# ----------------------------------------------------------------------------------------------------------------------
# Value loss
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("beta", [5e-4, 0.05])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("K", [2, 3, 4, 8])
def test_value_loss_matches_naive_value_and_gradient(K, seed, beta, holes):
    generator = torch.Generator().manual_seed(1000 * K + seed)
    B, T = 2 * K, 9
    mask = random_mask(B, T, generator, holes=holes)
    logp, ref_logp, token_kl = random_token_tensors(B, T, generator, mask)
    rewards = random_rewards(B, generator)

    logp32 = logp.clone().requires_grad_(True)
    ref32 = ref_logp.clone().requires_grad_(True)
    kl32 = token_kl.clone().requires_grad_(True)
    loss = vimpo_value_loss(logp32, ref32, kl32, mask, rewards, K, beta)
    loss.backward()

    logp64 = logp.double().requires_grad_(True)
    expected = naive_value_loss(logp64, ref_logp, token_kl, mask, rewards, K, beta)
    expected.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(logp32.grad.double(), logp64.grad, rtol=1e-4, atol=1e-10)
    # Padded positions and the fully masked row get exactly zero gradient.
    assert torch.all(logp32.grad[mask == 0] == 0)
    # kappa is stop-gradiented and ref_logp belongs to the frozen reference: no gradient reaches either.
    for other in (ref32, kl32):
        assert other.grad is None or torch.all(other.grad == 0)


def test_value_loss_bool_mask_equals_float_mask():
    generator = torch.Generator().manual_seed(7)
    mask = random_mask(8, 6, generator, holes=True)
    logp, ref_logp, token_kl = random_token_tensors(8, 6, generator, mask)
    rewards = random_rewards(8, generator)
    a = vimpo_value_loss(logp, ref_logp, token_kl, mask, rewards, 4, 0.05)
    b = vimpo_value_loss(logp, ref_logp, token_kl, mask.bool(), rewards, 4, 0.05)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_value_loss_hand_computed_group_centring_and_nan_rows():
    # At pi_theta = pi_ref and KL = 0 the implied value is 0, so the loss is 0.5 * mean_i (R_i - mean_g R)^2.
    # Group 0 = [1, 0, NaN, 0]: the NaN row is left out of the mean (1/3, not 1/4) and adds 0, the divisor stays B=8.
    # Group 1 = [NaN] * 4: no reward at all, adds 0.
    rewards = torch.tensor([1.0, 0.0, math.nan, 0.0] + [math.nan] * 4)
    logp = torch.full((8, 5), -1.0)
    mask = torch.ones(8, 5)
    loss = vimpo_value_loss(logp, logp.clone(), torch.zeros(8, 5), mask, rewards, 4, 0.05)
    expected = 0.5 * ((2 / 3) ** 2 + (1 / 3) ** 2 + (1 / 3) ** 2) / 8
    assert abs(loss.item() - expected) < 1e-7
    # No std scaling: multiplying the rewards by 10 multiplies the loss by 100.
    loss10 = vimpo_value_loss(logp, logp.clone(), torch.zeros(8, 5), mask, 10 * rewards, 4, 0.05)
    assert abs(loss10.item() - 100 * expected) < 1e-5


@pytest.mark.parametrize("K", [2, 3, 4, 8])
def test_value_loss_nan_rewards_match_naive(K):
    generator = torch.Generator().manual_seed(50 + K)
    B, T = 3 * K, 7
    mask = random_mask(B, T, generator)
    logp, ref_logp, token_kl = random_token_tensors(B, T, generator, mask)
    rewards = random_rewards(B, generator)
    rewards[1] = math.nan  # one missing reward in group 0
    rewards[2 * K : 3 * K] = math.nan  # a whole group without reward
    logp32 = logp.clone().requires_grad_(True)
    loss = vimpo_value_loss(logp32, ref_logp, token_kl, mask, rewards, K, 0.05)
    logp64 = logp.double().requires_grad_(True)
    expected = naive_value_loss(logp64, ref_logp, token_kl, mask, rewards, K, 0.05)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-8)
    # Gradients of the rows that have a reward match (the NaN rows are covered by the test below).
    loss.backward()
    expected.backward()
    has_reward = ~torch.isnan(rewards)
    torch.testing.assert_close(logp32.grad[has_reward].double(), logp64.grad[has_reward], rtol=1e-4, atol=1e-10)


def test_value_loss_nan_reward_rows_get_zero_gradient():
    logp = torch.randn(4, 3).requires_grad_(True)
    rewards = torch.tensor([1.0, math.nan, 0.0, 2.0])
    vimpo_value_loss(logp, torch.randn(4, 3), torch.rand(4, 3), torch.ones(4, 3), rewards, 2, 0.05).backward()
    assert torch.all(torch.isfinite(logp.grad))
    assert torch.all(logp.grad[1] == 0)


def test_group_centered_rewards_matches_naive_and_checks_shape():
    rewards = torch.tensor([1.0, 0.0, math.nan, 0.0, 2.0, 4.0, 3.0, 5.0, math.nan, math.nan, math.nan, math.nan])
    means = naive_group_means(rewards.tolist(), 4)
    expected = torch.tensor([r - m for r, m in zip(rewards.tolist(), means, strict=True)], dtype=torch.float64)
    torch.testing.assert_close(
        group_centered_rewards(rewards, 4).double(), expected, rtol=1e-6, atol=1e-7, equal_nan=True
    )
    with pytest.raises(ValueError, match="num_generations"):
        group_centered_rewards(torch.zeros(6), 4)


# ----------------------------------------------------------------------------------------------------------------------
# Actor advantage
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("gae_lambda", [1.0, 0.95, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_advantages_match_naive_recursion(seed, gae_lambda, holes):
    generator = torch.Generator().manual_seed(300 + seed)
    B, T, beta = 6, 17, 0.05
    mask = random_mask(B, T, generator, holes=holes)
    logp, ref_logp, token_kl = random_token_tensors(B, T, generator, mask)
    logp = logp.requires_grad_(True)
    advantages = vimpo_advantages(logp, ref_logp, token_kl, mask, beta, gae_lambda=gae_lambda)
    expected = naive_advantages(logp.detach(), ref_logp, token_kl, mask, beta, gae_lambda)
    assert advantages.shape == (B, T) and advantages.dtype == torch.float32
    assert advantages.grad_fn is None and not advantages.requires_grad
    torch.testing.assert_close(advantages.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.all(advantages[mask == 0] == 0)


def test_advantages_pass_through_tool_output():
    """A model token before a tool response is credited with the model tokens after it (docs/algorithms.md#vimpo-advantage): with
    lambda = 1 the advantage at every model token is the sum of delta over the row's later model tokens."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])  # two model tokens, two tool tokens, two model tokens
    logp = torch.tensor([[1.0, 2.0, 9.0, 9.0, 3.0, 4.0, 9.0]])
    zeros = torch.zeros_like(logp)
    advantages = vimpo_advantages(logp, zeros, zeros, mask, beta=1.0)
    assert advantages.tolist() == [[10.0, 9.0, 0.0, 0.0, 7.0, 4.0, 0.0]]
    half = vimpo_advantages(logp, zeros, zeros, mask, beta=1.0, gae_lambda=0.5)
    torch.testing.assert_close(half, torch.tensor([[1 + 1 + 0.75 + 0.5, 2 + 1.5 + 1.0, 0, 0, 3 + 2.0, 4.0, 0]]))


def test_advantages_default_lambda_is_one_and_equals_reverse_cumsum():
    generator = torch.Generator().manual_seed(11)
    mask = random_mask(4, 10, generator)
    logp, ref_logp, token_kl = random_token_tensors(4, 10, generator, mask)
    delta = torch.where(mask.bool(), 5e-4 * (logp - ref_logp - token_kl), 0.0).double()
    reverse_cumsum = delta.flip(1).cumsum(1).flip(1)
    advantages = vimpo_advantages(logp, ref_logp, token_kl, mask, 5e-4)
    torch.testing.assert_close(advantages.double(), reverse_cumsum, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("gae_lambda", [0.95, 1.0])
def test_advantages_long_sequence_no_overflow(gae_lambda):
    generator = torch.Generator().manual_seed(5)
    B, T, beta = 2, 5000, 0.05
    mask = torch.ones(B, T)
    mask[1, 4000:] = 0  # a shorter second row
    mask[1, 1000:1010] = 0  # and a hole in it
    logp, ref_logp, token_kl = random_token_tensors(B, T, generator, mask)
    advantages = vimpo_advantages(logp, ref_logp, token_kl, mask, beta, gae_lambda=gae_lambda)
    expected = naive_advantages(logp, ref_logp, token_kl, mask, beta, gae_lambda)
    assert torch.all(torch.isfinite(advantages))
    scale = expected.abs().max().item()
    torch.testing.assert_close(advantages.double(), expected, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------------------------------------------------
# Whitening
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_mean_std_over_processes_covers_every_process(seed):
    # Two processes holding the same shard: summing over processes doubles every reduced quantity, so the statistics
    # must be those of the shard concatenated with itself (the count doubles, which moves the Bessel correction).
    generator = torch.Generator().manual_seed(410 + seed)
    mask = random_mask(5, 13, generator, holes=True)
    values = (3.0 * torch.randn(5, 13, generator=generator) + 1.5).masked_fill(mask == 0, 1e6)
    mean, std = masked_mean_std(values, mask, lambda tensor: 2 * tensor)
    naive_mean, naive_std = naive_mean_std(torch.cat([values, values]).double(), torch.cat([mask, mask]))
    assert abs(mean.item() - naive_mean) < 1e-5 and abs(std.item() - naive_std) < 1e-5
    assert abs(std.item() - masked_mean_std(values, mask)[1].item()) > 1e-4  # the reduction reached the count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_mean_std_and_whiten_match_naive(seed):
    generator = torch.Generator().manual_seed(400 + seed)
    mask = random_mask(5, 13, generator, holes=True)
    values = 3.0 * torch.randn(5, 13, generator=generator) + 1.5
    values = values.masked_fill(mask == 0, 1e6)  # garbage at padding must not enter the statistics
    mean, std = masked_mean_std(values, mask)
    naive_mean, naive_std = naive_mean_std(values.double(), mask)
    assert abs(mean.item() - naive_mean) < 1e-5 and abs(std.item() - naive_std) < 1e-5

    whitened = whiten(values, mask)
    mask_rows, value_rows = mask.tolist(), values.double().tolist()
    expected = [
        [(v - naive_mean) / math.sqrt(naive_std**2 + 1e-8) if m else 0.0 for v, m in zip(vr, mr, strict=True)]
        for vr, mr in zip(value_rows, mask_rows, strict=True)
    ]
    torch.testing.assert_close(whitened.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)

    # Statistics passed in (as a trainer does with values all-reduced over processes) are used as given.
    given = whiten(values, mask, mean=torch.tensor(0.5), std=torch.tensor(2.0))
    expected_given = torch.where(mask.bool(), (values.double() - 0.5) / math.sqrt(4.0 + 1e-8), 0.0)
    torch.testing.assert_close(given.double(), expected_given, rtol=1e-6, atol=1e-6)


def test_whitening_variance_is_the_unbiased_one_for_every_process_count():
    """The choice pinned here (docs/algorithms.md, VIMPO whitening): the Bessel-corrected variance over the valid
    tokens of all processes. The official code uses it on one process but the biased variance on several, so its
    update would depend on the process count; ours is the same on 1 and 2 processes (test_vimpo_trainer.py)."""
    values, mask = torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.ones(1, 4)
    mean, std = masked_mean_std(values, mask)
    assert mean.item() == pytest.approx(1.5) and std.item() ** 2 == pytest.approx(5 / 3)  # not 5 / 4
    # Two processes holding two tokens each give the same statistics as one process holding all four.
    other = torch.tensor([2.0, 3.0])  # the other process's valid values

    def add_the_other_process(local: torch.Tensor) -> torch.Tensor:
        if local.ndim == 1:  # (sum, count)
            return local + torch.stack([other.sum(), torch.tensor(float(other.numel()))])
        return local + (other - 1.5).square().sum()  # squared deviations from the global mean

    mean, std = masked_mean_std(torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), add_the_other_process)
    assert mean.item() == pytest.approx(1.5) and std.item() ** 2 == pytest.approx(5 / 3)


def test_whiten_keeps_rounding_noise_negligible():
    # epsilon under the square root (verl's masked_whiten): noise with std ~1e-9 is not scaled up to unit size.
    noise = 1e-9 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    assert whiten(noise, torch.ones(4, 16)).abs().max() < 1e-4


def test_whiten_degenerate_masks_are_finite():
    one_token = torch.zeros(2, 4)
    one_token[0, 2] = 1
    for mask in (one_token, torch.zeros(2, 4)):
        assert torch.all(torch.isfinite(whiten(torch.randn(2, 4), mask)))


# ----------------------------------------------------------------------------------------------------------------------
# Dual-clip PPO surrogate
# ----------------------------------------------------------------------------------------------------------------------

# Log-ratios far inside and outside the clip range, none exactly on a clip boundary (log 0.8, log 1.28, log 10),
# where the max/min is tied and the sub-gradient choice is a convention.
LOG_RATIOS = [
    -30.0,
    -10.0,
    -3.0,
    -1.0,
    -0.5,
    -0.3,
    -0.1,
    -1e-3,
    0.0,
    1e-3,
    0.1,
    0.2,
    0.3,
    0.5,
    1.0,
    2.0,
    2.5,
    5.0,
    30.0,
]
ADVANTAGES = [-5.0, -1.0, -0.3, -1e-3, 0.0, 1e-3, 0.3, 1.0, 5.0]


@pytest.mark.parametrize(
    "eps_low, eps_high, dual_clip", [(0.2, 0.28, 10.0), (0.1, 0.1, 3.0), (0.3, 0.5, 1.5)], ids=["default", "a", "b"]
)
def test_dual_clip_ppo_matches_naive_value_and_gradient(eps_low, eps_high, dual_clip):
    generator = torch.Generator().manual_seed(9)
    grid = [(lr, a) for lr in LOG_RATIOS for a in ADVANTAGES]
    old = -2.0 * torch.rand(len(grid), generator=generator)
    logp = old + torch.tensor([lr for lr, _ in grid])
    advantages = torch.tensor([a for _, a in grid])

    logp32 = logp.clone().requires_grad_(True)
    advantages32 = advantages.clone().requires_grad_(True)
    old32 = old.clone().requires_grad_(True)
    kwargs = dict(epsilon_low=eps_low, epsilon_high=eps_high, dual_clip=dual_clip)
    if (eps_low, eps_high, dual_clip) == (0.2, 0.28, 10.0):
        kwargs = {}  # the documented defaults
    loss = dual_clip_ppo_loss(logp32, old32, advantages32, **kwargs)
    loss.sum().backward()

    logp64 = logp.double().requires_grad_(True)
    naive = torch.stack(
        [
            naive_dual_clip_token(logp64[n] - float(old[n]), float(advantages[n]), eps_low, eps_high, dual_clip)
            for n in range(len(grid))
        ]
    )
    naive.sum().backward()

    assert loss.shape == logp.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), naive.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(logp32.grad.double(), logp64.grad, rtol=2e-5, atol=1e-6)
    assert advantages32.grad is None and old32.grad is None


def test_dual_clip_bounds_negative_advantage_loss():
    # A < 0 and a huge ratio: the plain PPO loss -A r would be 5 * e^30; the dual clip caps it at -A * c = 50.
    loss = dual_clip_ppo_loss(torch.tensor([30.0]), torch.tensor([0.0]), torch.tensor([-5.0]))
    assert loss.item() == pytest.approx(50.0)


def test_dual_clip_gradient_finite_when_ratio_overflows():
    logp = torch.tensor([100.0, 100.0], requires_grad=True)
    loss = dual_clip_ppo_loss(logp, torch.zeros(2), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.28, 10.0]))
    loss.sum().backward()
    assert torch.all(logp.grad == 0)  # both tokens sit in a clipped branch


# ----------------------------------------------------------------------------------------------------------------------
# Sampled KL estimators
# ----------------------------------------------------------------------------------------------------------------------


def test_token_kl_estimates_match_formulas():
    generator = torch.Generator().manual_seed(3)
    ref = -4.0 * torch.rand(200, generator=generator)
    log_ratio = torch.cat([10.0 * torch.rand(100, generator=generator) - 5.0, torch.tensor([1e-4, -1e-4, 0.0])])
    ref = ref[: log_ratio.numel()]
    logp = (ref + log_ratio).requires_grad_(True)
    lp64, ref64 = logp.detach().double(), ref.double()
    x = lp64 - ref64
    expected = {"k2": 0.5 * x**2, "k3": torch.exp(ref64 - lp64) - (ref64 - lp64) - 1.0}
    for name, value in expected.items():
        estimate = token_kl_estimate(logp, ref, name)
        assert estimate.grad_fn is None and estimate.dtype == torch.float32
        torch.testing.assert_close(estimate.double(), value, rtol=1e-5, atol=1e-9)
        assert torch.all(estimate >= -1e-7)


@pytest.mark.parametrize("estimator", ["k1", "exact", "kl", ""])
def test_token_kl_estimate_unknown_estimator_raises(estimator):
    with pytest.raises(ValueError, match="estimator"):
        token_kl_estimate(torch.zeros(2, 3), torch.zeros(2, 3), estimator)


# ----------------------------------------------------------------------------------------------------------------------
# Exact KL, whole and chunked
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_token_kl_matches_full_softmax(temperature, dtype):
    generator = torch.Generator().manual_seed(21)
    N, V = 11, 257
    policy_logits = (3.0 * torch.randn(N, V, generator=generator)).to(dtype)
    ref_logits = (3.0 * torch.randn(N, V, generator=generator)).to(dtype)
    ref_logits[0] = policy_logits[0]  # identical distributions: KL exactly 0
    policy_before, ref_before = policy_logits.clone(), ref_logits.clone()
    kl = exact_token_kl(policy_logits, ref_logits, temperature)
    expected, _, _ = naive_kl_and_logps(policy_logits, ref_logits, None, temperature)
    assert kl.shape == (N,) and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)
    assert abs(kl[0].item()) < 1e-6 and torch.all(kl >= -1e-6)
    # The inputs are not modified (the implementation works in place on its own temporaries only).
    assert torch.equal(policy_logits, policy_before) and torch.equal(ref_logits, ref_before)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("scale_and_cap", [(1.0, None), (0.125, None), (4.0, 3.0)])
def test_exact_token_kl_matches_trls_chunked_divergence_kernel(temperature, scale_and_cap):
    """The pure function (for stacks that hold logits) and TRL's kernel (what VIMPOTrainer runs on hidden states and
    LM heads, with a logit scale and soft-cap) compute the same KL(pi_theta || pi_ref)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    scale, softcap = scale_and_cap
    generator = torch.Generator().manual_seed(23)
    N, H, V = 13, 8, 4099  # not a multiple of the kernel's vocabulary tile
    policy_hidden, ref_hidden = torch.randn(2, N, H, generator=generator)
    policy_weight, ref_weight = 3.0 * torch.randn(2, V, H, generator=generator)
    ref_bias = torch.randn(V, generator=generator)
    kernel_kl, _ = ChunkedDivergenceFunction.apply(
        policy_hidden, policy_weight, None, ref_hidden, ref_weight, ref_bias, 1.0, temperature, scale, softcap,
        scale, softcap,
    )  # fmt: skip

    def logits(hidden, weight, bias=None):
        values = (hidden @ weight.T + (0.0 if bias is None else bias)) * scale
        return values if softcap is None else softcap * torch.tanh(values / softcap)

    kl = exact_token_kl(logits(policy_hidden, policy_weight), logits(ref_hidden, ref_weight, ref_bias), temperature)
    assert kl.min() > 1e-2
    torch.testing.assert_close(kl, kernel_kl, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Zero-mean token signal (docs/algorithms.md#vimpo-scores): E_{a~pi}[rho(a) - kappa] = 0 with the exact KL.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state_logits():
    """Per-position full logits (S, V) of two tiny models (policy seed 0, reference seed 1) on random sequences."""
    from gnivo_trl.testing import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    policy = build_tiny_model(tokenizer, seed=0).eval()
    reference = build_tiny_model(tokenizer, seed=1).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, len(tokenizer), (3, 8), generator=generator)
    with torch.no_grad():
        policy_logits = policy(input_ids=input_ids).logits
        ref_logits = reference(input_ids=input_ids).logits
    V = policy_logits.size(-1)
    return policy_logits.reshape(-1, V).float(), ref_logits.reshape(-1, V).float()


def _expected_token_signal(policy_logits, ref_logits, temperature, kappa_of_token, beta=1.0):
    """``sum_a pi(a|s) * (rho(a) - kappa(a))`` per state ``s``, enumerating every vocabulary token ``a``.

    The sampled-token log-probs are float32 log-softmaxes of every vocabulary token, ``kappa`` comes from the
    package's :func:`exact_token_kl` (through ``kappa_of_token(logp, ref_logp, exact_kl)``) and ``rho - kappa`` from
    ``vimpo_advantages`` with ``lambda=0``, which returns ``delta`` itself.
    """
    S, V = policy_logits.shape
    policy_logp = torch.log_softmax(policy_logits.float() / temperature, dim=-1).reshape(-1)  # row s*V + a
    ref_logp = torch.log_softmax(ref_logits.float() / temperature, dim=-1).reshape(-1)
    exact_kl = exact_token_kl(policy_logits, ref_logits, temperature)  # (S,), one value per state
    token_kl = kappa_of_token(policy_logp, ref_logp, exact_kl.repeat_interleave(V))
    delta = vimpo_advantages(
        policy_logp[:, None], ref_logp[:, None], token_kl[:, None], torch.ones(S * V, 1), beta, 0.0
    ).reshape(S, V)
    pi = torch.softmax(policy_logits.double() / temperature, dim=-1)
    return (pi * delta.double()).sum(dim=-1), exact_kl


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_signal_has_zero_mean_under_pi_with_exact_kl(tiny_state_logits, temperature):
    policy_logits, ref_logits = tiny_state_logits

    expectation, exact_kl = _expected_token_signal(policy_logits, ref_logits, temperature, lambda lp, ref, kl: kl)
    assert exact_kl.min().item() > 1e-3  # the two models really differ, so the check is not vacuous
    assert expectation.abs().max().item() < 1e-6

    # k2 is biased: E_pi[0.5 (log pi - log pi_ref)^2] != KL, so with k2 the token signal's mean is not zero.
    expectation_k2, _ = _expected_token_signal(
        policy_logits, ref_logits, temperature, lambda lp, ref, kl: token_kl_estimate(lp, ref, "k2")
    )
    assert expectation_k2.abs().max().item() > 1e-5

    # k3 = (q/p - 1) - log(q/p) is an UNBIASED estimator of KL(p || q) under a ~ p (E_p[q/p] = sum_a q(a) = 1), so
    # with k3 the expectation over a ~ pi is zero as well (what k3 changes is that kappa varies with the sampled
    # token). Through the float32 package path the residue is the float32 rounding of the log-normaliser
    # (|log Z| * 6e-8, about 4e-7 here), hence the looser bound; in float64 it is zero to 1e-12.
    expectation_k3, _ = _expected_token_signal(
        policy_logits, ref_logits, temperature, lambda lp, ref, kl: token_kl_estimate(lp, ref, "k3")
    )
    assert expectation_k3.abs().max().item() < 2e-6
    log_p = torch.log_softmax(policy_logits.double() / temperature, dim=-1)
    log_q = torch.log_softmax(ref_logits.double() / temperature, dim=-1)
    p = log_p.exp()
    kl64 = (p * (log_p - log_q)).sum(-1)
    k3_mean = (p * (torch.expm1(log_q - log_p) - (log_q - log_p))).sum(-1)
    k2_mean = (p * 0.5 * (log_p - log_q) ** 2).sum(-1)
    assert (k3_mean - kl64).abs().max().item() < 1e-12
    assert (k2_mean - kl64).abs().max().item() > 1e-5
    # ...but per token, k3 is not the constant KL of the state.
    k3_tokens = token_kl_estimate(log_p[0].float(), log_q[0].float(), "k3")
    assert (k3_tokens.max() - k3_tokens.min()).item() > 1e-3
