"""GN-IVO turn units (``gnivo_prefix_unit="turn"``): :func:`gnivo_trl.steps.turn_unit_ends` against a naive loop on
hand-built multi-turn masks, and the loss with tool output (mask holes) against the naive float64 GN-IVO loss."""

from __future__ import annotations

import pytest
import torch
from test_losses_gnivo import assert_grad_close, run_library, run_naive

from gnivo_trl import GNIVOConfig
from gnivo_trl.gnivo_config import PREFIX_UNITS
from gnivo_trl.losses import gnivo_linearized_row_loss, gnivo_loss, group_weights, prefix_log_ratios, unit_boundaries
from gnivo_trl.steps import turn_unit_ends


def naive_turn_ends(mask_row: list[int]) -> list[bool]:
    """A token closes a turn when it is a model token and the next position is tool output, padding or the end."""
    T = len(mask_row)
    return [bool(mask_row[s]) and (s + 1 == T or not mask_row[s + 1]) for s in range(T)]


def multi_turn_mask(turns: list[tuple[int, int]], T: int) -> list[int]:
    """A completion of ``(model tokens, tool tokens)`` turns, right-padded to ``T``: 1 on model tokens, 0 on tool
    output and padding (completion_mask * tool_mask)."""
    row: list[int] = []
    for model_tokens, tool_tokens in turns:
        row += [1] * model_tokens + [0] * tool_tokens
    assert len(row) <= T
    return row + [0] * (T - len(row))


HAND_BUILT = [
    # (turns, expected turn-end positions)
    ([(3, 2), (2, 0)], [2, 6]),  # one tool call, final answer
    ([(1, 1), (1, 3), (2, 0)], [0, 2, 7]),  # two tool calls, one-token turns
    ([(4, 0)], [3]),  # no tool output: a single turn (sequence units)
    ([(2, 3)], [1]),  # the tool result is the last thing in the completion (the answer was truncated away)
    ([(0, 0)], []),  # fully masked row
    ([(3, 2), (5, 0)], [2, 9]),  # the final turn fills the row
]


@pytest.mark.parametrize("turns, expected", HAND_BUILT)
def test_turn_ends_on_hand_built_masks(turns, expected):
    mask = torch.tensor([multi_turn_mask(turns, 10)])
    ends = turn_unit_ends(mask)
    assert ends.dtype == torch.bool and ends.shape == mask.shape
    assert torch.nonzero(ends[0]).flatten().tolist() == expected
    assert ends[0].tolist() == naive_turn_ends(mask[0].tolist())


@pytest.mark.parametrize("seed", range(5))
def test_turn_ends_equal_a_naive_loop_on_random_masks(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 7, 40
    rows = []
    for _ in range(B):
        turns = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            turns.append((int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))))
        rows.append(multi_turn_mask(turns, T))
    for dtype in (torch.long, torch.float32, torch.bool):
        mask = torch.tensor(rows).to(dtype)
        expected = torch.tensor([naive_turn_ends(row) for row in rows])
        assert torch.equal(turn_unit_ends(mask), expected)
    # Every turn end is a unit boundary as the loss sees it, and the loss adds nothing else.
    assert torch.equal(unit_boundaries(mask, turn_unit_ends(mask)), expected)


def test_without_tool_output_turns_are_sequence_units():
    g = torch.Generator().manual_seed(0)
    K, T = 4, 12
    lengths = torch.tensor([12, 5, 1, 9, 7, 12, 3, 10])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logp = -torch.rand(8, T, generator=g)
    old = logp + 0.3 * torch.randn(8, T, generator=g)
    rewards = torch.rand(8, generator=g)
    turn = gnivo_loss(logp, old, mask, rewards, K, 0.2, boundaries=turn_unit_ends(mask))
    sequence = gnivo_loss(logp, old, mask, rewards, K, 0.2, boundaries=torch.zeros_like(mask, dtype=torch.bool))
    assert torch.equal(turn, sequence)
    assert torch.equal(turn_unit_ends(mask).sum(dim=1), (lengths > 0).long())


def tool_case(seed: int, K: int = 4, n_groups: int = 2):
    """A float64 batch of multi-turn completions: model turns separated by tool output, ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    B, T = K * n_groups, 24
    rows = []
    for _ in range(B):
        turns = [
            (int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g)))
            for _ in range(int(torch.randint(0, 3, (1,), generator=g)))
        ]
        turns.append((int(torch.randint(1, 6, (1,), generator=g)), 0))
        rows.append(multi_turn_mask(turns, T))
    mask = torch.tensor(rows, dtype=torch.float64)
    logp = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.rand(B, generator=g, dtype=torch.float64)
    return logp, old, mask, rewards


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("units", ["token", "turn"])
def test_loss_with_tool_output_equals_naive_and_gives_tool_tokens_zero_gradient(seed, units):
    logp, old, mask, rewards = tool_case(seed)
    boundaries = turn_unit_ends(mask) if units == "turn" else None
    # Garbage log-probs at tool positions (TRL scores them: they are completion tokens) and padding must not matter.
    masked = mask == 0
    noisy = torch.where(masked, logp - 50.0 * torch.rand_like(logp), logp)
    loss, grad = run_library(noisy, old, mask, rewards, 4, 0.2, boundaries, "softmax")
    expected_loss, expected_grad = run_naive(logp, old, mask, rewards, 4, 0.2, boundaries, "softmax")
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, expected_grad)
    assert torch.all(grad[masked] == 0)
    assert grad[mask.bool()].abs().sum() > 0


def test_turn_prefix_sums_skip_tool_output():
    """S_i(t) at turn t is the model tokens' log-ratio summed over the first t turns, tool output excluded."""
    logp, old, mask, _ = tool_case(7)
    prefix = prefix_log_ratios(logp, old, mask, turn_unit_ends(mask))
    for i in range(mask.size(0)):
        total, t = 0.0, 0
        ends = naive_turn_ends(mask[i].long().tolist())
        for s in range(mask.size(1)):
            if mask[i, s]:
                total += float(logp[i, s] - old[i, s])
            if ends[s]:
                assert abs(float(prefix.values[i, t]) - total) < 1e-5
                t += 1
        assert int(prefix.num_units[i]) == t


def test_linearized_row_loss_with_tool_output_gives_tool_tokens_zero_gradient():
    """The split-group loss path (groups spread over micro-batches) also ignores tool tokens."""
    logp, _, mask, rewards = tool_case(3)
    boundaries = turn_unit_ends(mask)
    weights = group_weights(rewards.float(), 4, 0.2)
    horizon = unit_boundaries(mask, boundaries).sum(dim=1).reshape(-1, 4).amax(dim=1).repeat_interleave(4)
    logp = logp.float().requires_grad_(True)
    rows = gnivo_linearized_row_loss(logp, logp.detach(), mask, boundaries, *weights, group_horizon=horizon)
    (grad,) = torch.autograd.grad(rows.sum(), logp)
    assert torch.all(grad[mask == 0] == 0)
    assert grad[mask.bool()].abs().sum() > 0


def test_config_accepts_turn_units():
    assert "turn" in PREFIX_UNITS
    config = GNIVOConfig(output_dir="unused", use_cpu=True, bf16=False, gnivo_prefix_unit="turn")
    assert config.gnivo_prefix_unit == "turn"
    with pytest.raises(ValueError, match="gnivo_prefix_unit='turns'.*token, step, turn, sequence"):
        GNIVOConfig(output_dir="unused", use_cpu=True, bf16=False, gnivo_prefix_unit="turns")
