"""GN-IVO targets the right policy (docs/algorithms.md#gnivo-theorem2; Theorem 2 of the GN-IVO paper).

A tiny autoregressive problem whose sequences can all be enumerated: a tabular policy with free logits for every
prefix state, a fixed random pi_old, and a deterministic reward R(y) per full sequence. The EXPECTED GN-IVO loss over
groups of K i.i.d. samples from pi_old is computed exactly (no sampling noise) by enumerating every ordered K-tuple
of sequences, weighting each group's loss ``L_g`` by the tuple's probability under pi_old. Minimising it over the
tabular logits must give

    pi*(y) = pi_old(y) * exp(R(y) / alpha) / Z,

at every prefix (i.e. pi_theta(y_<=t) = pi_old(y_<=t) * exp(V(y_<=t)) / Z with exp(V(y_<=t)) = E_old[exp(R/alpha) | y_<=t])
for ``weight_normalization="none"``, and on full sequences for ``"softmax"`` with sequence units. The softmax weights
with token units are biased at prefixes for small K (docs/algorithms.md#gnivo-theorem2), a bias that fades as K grows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from gnivo_trl.losses import gnivo_group_losses, group_weights, prefix_log_ratios

ALPHA = 0.2
TOLERANCE = 1e-3


@dataclass
class TabularProblem:
    sequences: list[tuple[int, ...]]  # every possible completion, as token tuples
    num_states: int  # prefix states (the tabular policy has one row of logits per state)
    vocab: int
    token_state: torch.Tensor  # (N, L) state index before each token (0 at padding)
    tokens: torch.Tensor  # (N, L) token ids (0 at padding)
    mask: torch.Tensor  # (N, L) 1 on real tokens
    old_logits: torch.Tensor  # (num_states, V) pi_old
    rewards: torch.Tensor  # (N,) float64


def make_problem(vocab: int, length: int, seed: int, eos: bool = False) -> TabularProblem:
    """All sequences of ``length`` tokens over ``vocab`` tokens; with ``eos``, the last token id ends a sequence
    early (ragged lengths, right padding)."""
    g = torch.Generator().manual_seed(seed)
    eos_id = vocab - 1 if eos else None
    sequences: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...]) -> None:
        if len(prefix) == length or (prefix and prefix[-1] == eos_id):
            sequences.append(prefix)
            return
        for token in range(vocab):
            extend(prefix + (token,))

    extend(())
    states = sorted({y[:s] for y in sequences for s in range(len(y))}, key=lambda p: (len(p), p))
    state_index = {p: k for k, p in enumerate(states)}
    N = len(sequences)
    token_state = torch.zeros(N, length, dtype=torch.long)
    tokens = torch.zeros(N, length, dtype=torch.long)
    mask = torch.zeros(N, length)
    for n, y in enumerate(sequences):
        for s, token in enumerate(y):
            token_state[n, s] = state_index[y[:s]]
            tokens[n, s] = token
            mask[n, s] = 1.0
    return TabularProblem(
        sequences=sequences,
        num_states=len(states),
        vocab=vocab,
        token_state=token_state,
        tokens=tokens,
        mask=mask,
        old_logits=torch.randn(len(states), vocab, generator=g, dtype=torch.float64),
        rewards=torch.rand(N, generator=g, dtype=torch.float64),
    )


def token_log_probs(problem: TabularProblem, logits: torch.Tensor) -> torch.Tensor:
    """(N, L) log pi(token | prefix state) of every enumerated sequence; 0 at padding."""
    log_probs = torch.log_softmax(logits, dim=-1)[problem.token_state, problem.tokens]
    return log_probs * problem.mask


def sequence_probs(problem: TabularProblem, logits: torch.Tensor) -> torch.Tensor:
    return token_log_probs(problem, logits).sum(dim=1).exp()


def target_sequence_probs(problem: TabularProblem, alpha: float) -> torch.Tensor:
    """pi*(y) = pi_old(y) exp(R(y)/alpha) / Z."""
    log_target = token_log_probs(problem, problem.old_logits).sum(dim=1) + problem.rewards / alpha
    return torch.softmax(log_target, dim=0)


def prefix_gaps(problem: TabularProblem, probs: torch.Tensor, target: torch.Tensor) -> list[float]:
    """max |P(y_<=t) - P*(y_<=t)| over prefixes, for t = 1..L (a sequence shorter than t is its own event)."""
    length = problem.mask.size(1)
    gaps = []
    for t in range(1, length + 1):
        mass: dict[tuple[int, ...], list[float]] = {}
        for n, y in enumerate(problem.sequences):
            entry = mass.setdefault(y[:t], [0.0, 0.0])
            entry[0] += float(probs[n])
            entry[1] += float(target[n])
        gaps.append(max(abs(p - q) for p, q in mass.values()))
    return gaps


def expected_gnivo_loss_fn(
    problem: TabularProblem, K: int, alpha: float, weight_normalization: str, units: str, fixed_horizon: bool = False
):
    """theta -> E_{y_1..y_K ~ pi_old i.i.d.}[L_g], exactly, by enumerating all ordered K-tuples of sequences.

    ``fixed_horizon`` (diagnostic only, not the package's loss): every group averages over the batch's largest unit count
    instead of its own T_g."""
    N = len(problem.sequences)
    tuples = torch.tensor(list(itertools.product(range(N), repeat=K)))  # (G, K): group g = one K-tuple
    old_token = token_log_probs(problem, problem.old_logits)
    tuple_probs = old_token.sum(dim=1).exp()[tuples].prod(dim=1)  # (G,)
    assert float(tuple_probs.sum()) == pytest.approx(1.0, abs=1e-12)
    rows = tuples.reshape(-1)  # rows of group g are [g*K, (g+1)*K), as gnivo_trl.losses expects
    mask = problem.mask[rows]
    if units == "token":
        boundaries = None
    elif units == "step":  # token 0 plays the step delimiter: it closes a unit
        boundaries = (problem.tokens[rows] == 0) & mask.bool()
    elif units == "sequence":
        boundaries = torch.zeros(mask.shape, dtype=torch.bool)
    else:
        raise AssertionError(units)
    weights = group_weights(problem.rewards[rows].float(), K, alpha, weight_normalization)
    old_rows = old_token[rows]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        logp = token_log_probs(problem, theta)[rows]
        prefix = prefix_log_ratios(logp, old_rows, mask, boundaries)
        num_units = prefix.num_units
        if fixed_horizon:
            num_units = torch.full_like(num_units, prefix.values.size(1))
        group_losses = gnivo_group_losses(prefix.values, num_units, weights, K)
        return (group_losses.double() * tuple_probs).sum()

    return loss


def fit_tabular_policy(
    problem: TabularProblem, K: int, alpha: float, weight_normalization: str, units: str, fixed_horizon: bool = False
) -> torch.Tensor:
    """Minimise the expected GN-IVO loss over the tabular logits (started at pi_old) with L-BFGS."""
    loss_fn = expected_gnivo_loss_fn(problem, K, alpha, weight_normalization, units, fixed_horizon)
    theta = problem.old_logits.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        value = loss_fn(theta)
        value.backward()
        return value

    for _ in range(3):
        optimizer.step(closure)
    (grad,) = torch.autograd.grad(loss_fn(theta), theta)
    # Converged: the gradient is at float32 noise level relative to the loss scale.
    assert float(grad.abs().max()) < 1e-4 * max(1.0, float(loss_fn(theta).detach().abs()))
    return theta.detach()


PROBLEMS = [(2, 3), (3, 2)]  # (vocab, length): 8 and 9 sequences


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("vocab,length", PROBLEMS)
def test_none_weights_token_units_reach_tilted_policy_at_every_prefix(vocab, length, K):
    problem = make_problem(vocab, length, seed=vocab * 10 + length)
    target = target_sequence_probs(problem, ALPHA)
    # Non-trivial: pi_old is far from the target.
    assert max(prefix_gaps(problem, sequence_probs(problem, problem.old_logits), target)) > 0.05
    theta = fit_tabular_policy(problem, K, ALPHA, "none", "token")
    gaps = prefix_gaps(problem, sequence_probs(problem, theta), target)
    assert max(gaps) < TOLERANCE, gaps


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("vocab,length", PROBLEMS)
def test_softmax_weights_sequence_units_reach_tilted_policy_on_full_sequences(vocab, length, K):
    problem = make_problem(vocab, length, seed=vocab * 10 + length)
    target = target_sequence_probs(problem, ALPHA)
    theta = fit_tabular_policy(problem, K, ALPHA, "softmax", "sequence")
    torch.testing.assert_close(sequence_probs(problem, theta), target, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("units", ["token", "step"])
def test_none_weights_with_ragged_lengths_have_a_small_bias_from_the_group_horizon(units):
    # A documented limitation of the per-group horizon (docs/algorithms.md#gnivo-horizon), not of the implementation: with ragged lengths the per-group horizon
    # T_g = max_i n_i weights each prefix term by 1[t <= T_g] / T_g, a function of ALL group members' lengths, which
    # breaks the per-t structure of Theorem 2. The minimiser then misses pi* at prefixes by a few 1e-3 (measured
    # 4.2e-3 with token units and 5.4e-3 with step units here, K=2); the test below shows that a group-independent
    # horizon is exact. EOS ends sequences early (right padding, finished rows held in their terminal state); step
    # units close a unit at token 0.
    problem = make_problem(3, 3, seed=7, eos=True)
    assert len({int(m) for m in problem.mask.sum(dim=1)}) == 3  # lengths 1, 2 and 3 all occur
    target = target_sequence_probs(problem, ALPHA)
    theta = fit_tabular_policy(problem, 2, ALPHA, "none", units)
    gaps = prefix_gaps(problem, sequence_probs(problem, theta), target)
    assert TOLERANCE < max(gaps) < 1e-2, gaps


@pytest.mark.parametrize("units", ["token", "step"])
@pytest.mark.parametrize("K", [2, 3])
def test_ragged_lengths_are_exact_with_a_group_independent_horizon(K, units):
    # Diagnostic for the bias above: the same ragged problem, but every group averages over the same horizon
    # (the batch's largest unit count; gnivo_group_losses takes n_i as an argument, and prefix_log_ratios already
    # holds finished rows in their terminal state). Then the Eq. 9 weights are exact at every prefix, which shows
    # the gap comes from the group-dependent 1/T_g and not from the held-state rule or the step boundaries.
    problem = make_problem(3, 3, seed=7, eos=True)
    target = target_sequence_probs(problem, ALPHA)
    theta = fit_tabular_policy(problem, K, ALPHA, "none", units, fixed_horizon=True)
    gaps = prefix_gaps(problem, sequence_probs(problem, theta), target)
    assert max(gaps) < TOLERANCE, gaps


@pytest.mark.parametrize("weight_normalization", ["softmax", "none"])
def test_sequence_units_reach_tilted_policy_on_full_sequences_with_ragged_lengths(weight_normalization):
    problem = make_problem(3, 3, seed=7, eos=True)
    target = target_sequence_probs(problem, ALPHA)
    theta = fit_tabular_policy(problem, 2, ALPHA, weight_normalization, "sequence")
    torch.testing.assert_close(sequence_probs(problem, theta), target, rtol=0, atol=TOLERANCE)


def test_softmax_weights_token_units_are_biased_at_prefixes_for_small_K_and_the_bias_fades_with_K():
    # The per-group softmax normaliser couples the members: with token units the minimiser misses pi* at prefixes
    # t < T by a measurable amount for small K (docs/algorithms.md#gnivo-theorem2), and the gap shrinks as K grows.
    vocab, length = 2, 3
    problem = make_problem(vocab, length, seed=vocab * 10 + length)
    target = target_sequence_probs(problem, ALPHA)
    prefix_bias = {}
    for K in (2, 3, 4):
        theta = fit_tabular_policy(problem, K, ALPHA, "softmax", "token")
        gaps = prefix_gaps(problem, sequence_probs(problem, theta), target)
        prefix_bias[K] = max(gaps[: length - 1])  # prefixes t < T
    assert prefix_bias[2] > 1e-3, prefix_bias
    assert prefix_bias[3] > 1e-3, prefix_bias
    assert prefix_bias[2] > prefix_bias[3] > prefix_bias[4], prefix_bias
