"""GN-IVO and VIMPO with TRL's tools and environments: multi-turn rollouts, tool output out of the loss, turn units.

Generation is stubbed (:func:`trainer_harness.stub_tool_generation`): the first turn of most rows is a well-formed
Qwen3 tool call of ``add_numbers``; TRL parses it with the response parser of the tiny tokenizer's Qwen3 chat template
(:func:`gnivo_trl.testing.save_tiny_tool_model`), runs the tool (a plain function or an environment's method),
appends its output to the completion with ``tool_mask`` 0 and asks the stub for the next turn.
"""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from conftest import assert_same_update
from datasets import Dataset
from trainer_harness import (
    AdditionEnvironment,
    add_numbers,
    build_trainer,
    equal_length_dataset,
    parameter_update,
    reward_tool_use,
    stub_tool_generation,
)
from transformers import AutoTokenizer

import gnivo_trl.vimpo_trainer as vimpo_trainer_module
from gnivo_trl.group_bookkeeping import loss_mask
from gnivo_trl.steps import turn_unit_ends

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is experimental in TRL 1.16

K = 4
# Long enough for two tool calls, their responses and an answer (the stub's longest completion is ~135 tokens).
MAX_COMPLETION_LENGTH = 160


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory) -> str:
    from gnivo_trl.testing import save_tiny_tool_model

    return save_tiny_tool_model(tmp_path_factory.mktemp("tiny-tool-model"))


def environment_dataset(num_rows: int = 16) -> Dataset:
    """Rows without a ``prompt``: the environment's ``reset`` turns ``target`` into the task."""
    return Dataset.from_dict({"target": [5 + i % 7 for i in range(num_rows)]})


def build_agent_trainer(algorithm: str, model_dir: str, output_dir: str, environment: bool = False, **overrides):
    """A trainer whose rollouts call ``add_numbers``: a standalone tool (``tools=``) or the method of an
    :class:`AdditionEnvironment` (``environment_factory=``, rewarded by the environment, dataset without prompts)."""
    settings = dict(max_completion_length=MAX_COMPLETION_LENGTH, num_generations=K)
    settings.update(overrides)
    if environment:
        trainer = build_trainer(
            algorithm,
            model_dir,
            output_dir,
            reward=None,
            train_dataset=environment_dataset(),
            trainer_kwargs=dict(environment_factory=AdditionEnvironment),
            **settings,
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        trainer = build_trainer(
            algorithm,
            model_dir,
            output_dir,
            reward=reward_tool_use,
            train_dataset=equal_length_dataset(tokenizer),
            trainer_kwargs=dict(tools=[add_numbers]),
            **settings,
        )
    stub_tool_generation(trainer)
    return trainer


def generation_batch(trainer, num_prompts: int = 2) -> dict:
    """One scored generation batch of ``num_prompts`` groups of K rows, in training mode."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [row for row in trainer.train_dataset.select(range(num_prompts)) for _ in range(K)]
    return trainer._generate_and_score_completions(rows)


def tool_positions(batch: dict) -> torch.Tensor:
    """``(B, C)`` bool: completion tokens that are tool output."""
    return batch["completion_mask"].bool() & ~batch["tool_mask"].bool()


def assert_has_tool_output(batch: dict) -> None:
    tool = tool_positions(batch)
    assert tool.any(dim=1).sum() >= 2, "several rows hold tool output"
    assert (~tool.any(dim=1)).any(), "and some rows answered without a tool"
    # Tool output sits between model turns: every tool run is followed by model tokens or the row's end.
    assert (turn_unit_ends(loss_mask(batch)).sum(dim=1) >= 2).any()


def move_policy(trainer, scale: float = 0.05) -> None:
    """Perturb the policy away from the reference, so that VIMPO's KL and actor advantages are not zero."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


# ---------------------------------------------------------------------------------------------------------------------
# Multi-turn rollouts reach the loss: end-to-end steps with tools and with an environment
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm, environment, overrides",
    [
        ("gnivo", False, dict(gnivo_prefix_unit="turn")),
        ("gnivo", True, dict(gnivo_prefix_unit="turn")),
        ("gnivo", True, dict(gnivo_prefix_unit="token", per_device_train_batch_size=2, gradient_accumulation_steps=4)),
        ("vimpo", False, dict()),
        ("vimpo", True, dict(per_device_train_batch_size=4, gradient_accumulation_steps=2)),
    ],
    ids=["gnivo-tools-turn", "gnivo-environment-turn", "gnivo-environment-split", "vimpo-tools", "vimpo-environment"],
)
def test_trains_multi_turn(algorithm, environment, overrides, tool_model_dir, tmp_path):
    trainer = build_agent_trainer(
        algorithm, tool_model_dir, str(tmp_path), environment, max_steps=2, learning_rate=0.05, **overrides
    )
    scored = []
    generate_and_score = trainer._generate_and_score_completions

    def record(inputs):
        scored.append(generate_and_score(inputs))
        return scored[-1]

    trainer._generate_and_score_completions = record
    update = parameter_update(trainer)
    assert len(scored) == 2
    for batch in scored:
        assert_has_tool_output(batch)
    assert all(torch.isfinite(value).all() for value in update.values())
    assert all(value.abs().max() > 0 for value in update.values()), "every parameter tensor changes"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert all(entry["tools/call_frequency"] > 0 and entry["tools/failure_frequency"] == 0 for entry in logs)
    if environment:  # the environment's get_reward is a reward source of its own
        assert all("rewards/AdditionEnvironment/mean" in entry for entry in logs)
    if algorithm == "gnivo" and overrides["gnivo_prefix_unit"] == "turn":
        assert all(1.0 < entry["gnivo/prefix_horizon"] <= 3.0 for entry in logs)  # 1 to 3 turns per row


# ---------------------------------------------------------------------------------------------------------------------
# Tool output takes no part in either loss
# ---------------------------------------------------------------------------------------------------------------------


def _retain_policy_log_prob_gradient(trainer, captured: dict) -> None:
    """Make the trainer's per-token policy log-probs ``(B, C)`` keep their gradient, stored in ``captured``."""
    if hasattr(trainer, "_token_scores"):  # VIMPO
        token_scores = trainer._token_scores

        def scores_with_gradient(model, inputs):
            scores = token_scores(model, inputs)
            scores.logp.retain_grad()
            captured["logp"] = scores.logp
            return scores

        trainer._token_scores = scores_with_gradient
    else:
        policy_token_logps = trainer._policy_token_logps

        def logps_with_gradient(model, inputs):
            logp, entropy, aux_loss = policy_token_logps(model, inputs)
            logp.retain_grad()
            captured["logp"] = logp
            return logp, entropy, aux_loss

        trainer._policy_token_logps = logps_with_gradient


@pytest.mark.parametrize(
    "algorithm, overrides",
    [
        ("gnivo", dict(gnivo_prefix_unit="token", beta=0.04)),  # with TRL's KL penalty to the reference
        ("gnivo", dict(gnivo_prefix_unit="turn")),
        ("gnivo", dict(gnivo_prefix_unit="turn", per_device_train_batch_size=2, gradient_accumulation_steps=4)),
        ("vimpo", dict(vimpo_gae_lambda=0.9)),
    ],
    ids=["gnivo-token-kl", "gnivo-turn", "gnivo-turn-split-groups", "vimpo"],
)
def test_tool_tokens_get_exactly_zero_gradient(algorithm, overrides, tool_model_dir, tmp_path):
    """d loss / d logp is exactly 0 at every tool-output position, and not 0 on the model's tokens: tool output is
    out of GN-IVO's prefix sums and KL term, and out of VIMPO's value sum, actor loss and whitening."""
    trainer = build_agent_trainer(algorithm, tool_model_dir, str(tmp_path), **overrides)
    move_policy(trainer)  # VIMPO: non-zero KL and advantages; GN-IVO with beta: non-zero KL
    batch = generation_batch(trainer)
    assert_has_tool_output(batch)
    captured: dict = {}
    _retain_policy_log_prob_gradient(trainer, captured)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    grad = captured["logp"].grad
    tool = tool_positions(batch)
    assert torch.all(grad[tool] == 0)
    model_tokens = loss_mask(batch).bool()
    assert (grad[model_tokens] != 0).float().mean() > 0.5


def test_vimpo_credit_passes_through_tool_output(tool_model_dir, tmp_path, monkeypatch):
    """A model token just before a tool response is credited with the model tokens after it: with lambda = 0.9,
    ``A[s] = delta[s] + 0.9 * A[u]`` for ``u`` the first model token after the tool output (no discount, no reset
    across the hole), as the trainer computes it."""
    trainer = build_agent_trainer("vimpo", tool_model_dir, str(tmp_path), vimpo_gae_lambda=0.9)
    move_policy(trainer)
    batch = generation_batch(trainer)
    captured = {}
    vimpo_advantages = vimpo_trainer_module.vimpo_advantages

    def recording_advantages(logp, ref_logp, token_kl, mask, beta, gae_lambda=1.0):
        advantages = vimpo_advantages(logp, ref_logp, token_kl, mask, beta, gae_lambda)
        captured.update(logp=logp, ref=ref_logp, kl=token_kl, mask=mask, beta=beta, advantages=advantages)
        return advantages

    monkeypatch.setattr(vimpo_trainer_module, "vimpo_advantages", recording_advantages)
    trainer._compute_loss(trainer.model, batch)

    mask = captured["mask"].bool()
    assert torch.equal(mask, loss_mask(batch).bool())  # the advantage sees the mask with its tool holes
    delta = captured["beta"] * (captured["logp"] - captured["ref"] - captured["kl"])
    advantages = captured["advantages"]
    tool = tool_positions(batch)
    assert torch.all(advantages[tool] == 0)
    checked = 0
    for row in range(mask.size(0)):
        for s in torch.nonzero(mask[row, :-1] & tool[row, 1:]).flatten().tolist():  # last model token before a tool
            u = s + 1 + int(torch.nonzero(mask[row, s + 1 :])[0]) if mask[row, s + 1 :].any() else None
            if u is None:
                continue
            expected = delta[row, s] + 0.9 * advantages[row, u]
            torch.testing.assert_close(advantages[row, s], expected, rtol=1e-5, atol=1e-7)
            assert advantages[row, u] != 0
            checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------------------------------------------------
# Turn units in the trainer
# ---------------------------------------------------------------------------------------------------------------------


def test_turn_units_count_assistant_turns(tool_model_dir, tmp_path):
    """Each row has one unit per assistant turn (tool calls + 1); the group horizon is the group's largest count."""
    trainer = build_agent_trainer("gnivo", tool_model_dir, str(tmp_path), gnivo_prefix_unit="turn")
    batch = generation_batch(trainer)
    assert_has_tool_output(batch)
    tokenizer = trainer.processing_class
    turns = []
    for row in range(batch["completion_ids"].size(0)):
        text = tokenizer.decode(batch["completion_ids"][row][batch["completion_mask"][row].bool()])
        turns.append(text.count("<tool_response>") + 1)
    turns = torch.tensor(turns)
    assert torch.equal(turn_unit_ends(loss_mask(batch)).sum(dim=1), turns)
    assert torch.equal(batch["gnivo_group_horizon"], turns.reshape(-1, K).amax(dim=1).repeat_interleave(K))
    assert batch["gnivo_group_horizon"].max() >= 2


def test_turn_units_without_tools_warn_that_they_are_sequence_units(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gnivo_trl.gnivo_trainer"):
        build_trainer("gnivo", tiny_model_dir, str(tmp_path), gnivo_prefix_unit="turn")
    assert "loss is that of gnivo_prefix_unit='sequence'" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# The layout does not change the update, with tool output in the batch (docs/algorithms.md#layout-independence)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_update(tool_model_dir, tmp_path_factory):
    """Updates of TRL's default layout (one micro-batch holds the generation batch), cached per configuration."""
    cache = {}

    def get(algorithm: str, **extra):
        key = (algorithm, tuple(sorted(extra.items())))
        if key not in cache:
            trainer = build_agent_trainer(
                algorithm, tool_model_dir, str(tmp_path_factory.mktemp("ref")), per_device_train_batch_size=8, **extra
            )
            cache[key] = parameter_update(trainer)
        return cache[key]

    return get


@pytest.mark.parametrize(
    "layout",
    [
        dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=4),
    ],
    ids=["accumulation-whole-groups", "accumulation-split-groups"],
)
@pytest.mark.parametrize("unit", ["token", "turn"])
def test_gnivo_update_with_tool_output_does_not_depend_on_layout(
    unit, layout, tool_model_dir, tmp_path, reference_update
):
    trainer = build_agent_trainer("gnivo", tool_model_dir, str(tmp_path), gnivo_prefix_unit=unit, **layout)
    assert_same_update(parameter_update(trainer), reference_update("gnivo", gnivo_prefix_unit=unit))
    assert all(entry["tools/call_frequency"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_vimpo_value_update_with_tool_output_does_not_depend_on_layout(tool_model_dir, tmp_path, reference_update):
    # Two steps: at the second the policy differs from the reference, so the KL inside the value sum is not zero.
    extra = dict(max_steps=2, vimpo_actor_coeff=0.0)
    trainer = build_agent_trainer(
        "vimpo", tool_model_dir, str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4, **extra
    )
    assert_same_update(parameter_update(trainer), reference_update("vimpo", **extra))


# ---------------------------------------------------------------------------------------------------------------------
# Datasets without a prompt column
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo"])
def test_dataset_without_prompt_needs_an_environment(algorithm, tool_model_dir, tmp_path):
    no_prompt = environment_dataset(8)
    trainer = build_trainer(
        algorithm,
        tool_model_dir,
        str(tmp_path),
        reward=None,
        train_dataset=no_prompt,
        trainer_kwargs=dict(environment_factory=AdditionEnvironment, eval_dataset={"held_out": no_prompt}),
    )
    assert trainer.train_dataset.column_names == ["target"]
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column .*environment_factory"):
        build_trainer(
            algorithm,
            tool_model_dir,
            str(tmp_path),
            reward=reward_tool_use,
            train_dataset=no_prompt,
            trainer_kwargs=dict(tools=[add_numbers]),
        )
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column"):
        build_trainer(algorithm, tool_model_dir, str(tmp_path), train_dataset=no_prompt)
