"""VIMPOTrainer options of the authors' official code (issue 19), each against a naive reference: the renamed actor
weight and its deprecated alias, the Huber value loss, the candidate-set KL, the capped baseline, the reference
refresh, and the refusal of the soft value."""

import math

import pytest
import torch
from conftest import assert_refused_with_field_and_fix
from peft import LoraConfig
from trainer_harness import build_trainer, full_softmax_log_probs, save_tiny_family_model, start_training

from gnivo_trl import VIMPOConfig

CONFIG = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")


def _generation_batch(trainer, move_policy: float = 0.0) -> dict:
    """One training generation batch: 2 prompts x 4 completions, after moving the policy by ``move_policy`` noise."""
    start_training(trainer)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(move_policy * torch.randn_like(p))
    prompts = trainer.train_dataset.select(range(2))
    return trainer._generate_and_score_completions([prompts[0]] * 4 + [prompts[1]] * 4)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


def test_defaults_are_the_official_ones_and_change_nothing():
    config = VIMPOConfig(**CONFIG)
    assert (config.vimpo_actor_coeff, config.vimpo_actor_coef) == (5e-3, None)
    assert (config.vimpo_value_loss_type, config.vimpo_value_huber_delta) == ("squared_error", 0.005)
    assert (config.vimpo_kl_estimator, config.vimpo_candidate_kl_topk) == ("exact", 32)
    assert (config.vimpo_value_type, config.vimpo_cap_v0, config.vimpo_update_ref_freq) == ("raw", None, 0)
    assert config.sync_ref_model is False


def test_deprecated_actor_coef_warns_and_sets_actor_coeff():
    with pytest.warns(FutureWarning, match="vimpo_actor_coeff"):
        config = VIMPOConfig(**CONFIG, vimpo_actor_coef=0.0)
    assert config.vimpo_actor_coeff == 0.0
    with pytest.warns(FutureWarning):
        assert VIMPOConfig(**CONFIG, vimpo_actor_coef=0.2, vimpo_actor_coeff=0.2).vimpo_actor_coeff == 0.2
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"^vimpo_actor_coef=0\.2 .*vimpo_actor_coeff"):
        VIMPOConfig(**CONFIG, vimpo_actor_coef=0.2, vimpo_actor_coeff=0.1)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"^vimpo_actor_coeff=-1"):
        VIMPOConfig(**CONFIG, vimpo_actor_coef=-1.0)


def test_deprecated_alias_conflicts_with_the_new_name_set_to_its_default_value():
    """Set by the user is told from the default without comparing values: 5e-3 written out conflicts with the alias."""
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"^vimpo_actor_coef=0\.01 .*0\.005"):
        VIMPOConfig(**CONFIG, vimpo_actor_coeff=5e-3, vimpo_actor_coef=1e-2)
    with pytest.warns(FutureWarning):
        config = VIMPOConfig(**CONFIG, vimpo_actor_coef=1e-2)  # the alias alone still applies
    assert config.vimpo_actor_coeff == 1e-2 and type(config.vimpo_actor_coeff) is float
    assert type(VIMPOConfig(**CONFIG, vimpo_actor_coeff=5e-3).vimpo_actor_coeff) is float


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(vimpo_value_loss_type="l1"), "vimpo_value_loss_type"),
        (dict(vimpo_value_huber_delta=0.0), "vimpo_value_huber_delta"),
        (dict(vimpo_value_huber_delta=-0.5), "vimpo_value_huber_delta"),
        (dict(vimpo_value_huber_delta=math.inf), "vimpo_value_huber_delta"),
        (dict(vimpo_kl_estimator="candidate", vimpo_candidate_kl_topk=8), "vimpo_kl_estimator"),
        (dict(vimpo_kl_estimator="candidate_set", vimpo_candidate_kl_topk=0), "vimpo_candidate_kl_topk"),
        (dict(vimpo_value_type="soft"), "vimpo_value_type"),
        (dict(vimpo_value_type="hard"), "vimpo_value_type"),
        (dict(vimpo_cap_v0=math.nan), "vimpo_cap_v0"),
        (dict(vimpo_cap_v0=math.inf), "vimpo_cap_v0"),
        (dict(vimpo_update_ref_freq=-1), "vimpo_update_ref_freq"),
        # One generation batch is half an optimizer step: a refresh after every batch would fall inside a step.
        (
            dict(vimpo_update_ref_freq=1, gradient_accumulation_steps=4, steps_per_generation=2),
            "vimpo_update_ref_freq",
        ),
        (dict(sync_ref_model=True, ref_model_mixup_alpha=1.0), "sync_ref_model"),
    ],
)
def test_bad_option_is_refused_with_field_and_fix(overrides, field):
    assert_refused_with_field_and_fix(VIMPOConfig, field, **CONFIG, **overrides)


def test_soft_value_refusal_says_why():
    with pytest.raises(ValueError, match="generation time"):
        VIMPOConfig(**CONFIG, vimpo_value_type="soft")


@pytest.mark.parametrize(
    ("layout", "sync_steps"),
    [
        (dict(), 3),  # one optimizer step per generation batch (TRL's default)
        (dict(gradient_accumulation_steps=2, num_iterations=2), 6),  # two optimizer steps per batch
        (dict(gradient_accumulation_steps=2, steps_per_generation=4), 6),
        (dict(gradient_accumulation_steps=4, steps_per_generation=2, vimpo_update_ref_freq=2), 1),  # two per step
    ],
)
def test_reference_refresh_is_a_hard_copy_every_n_generation_batches(layout, sync_steps):
    config = VIMPOConfig(**CONFIG, **{"vimpo_update_ref_freq": 3, **layout})
    assert (config.ref_model_mixup_alpha, config.ref_model_sync_steps) == (1.0, sync_steps)
    assert config.sync_ref_model is False  # GRPOTrainer adds no callback of its own; VIMPOTrainer adds TRL's


# ----------------------------------------------------------------------------------------------------------------------
# Huber value loss
# ----------------------------------------------------------------------------------------------------------------------


def test_huber_value_loss_equals_a_naive_per_row_loop(tiny_model_dir, tmp_path):
    """The value loss (actor weight 0) of a moved policy, rows without a reward included, equals a float64 loop
    over the rows: residual from full-softmax scores, Huber with both branches taken, rows without reward weighted
    0 but counted in the mean (as the squared error is)."""

    def sometimes_none(completions, **kwargs):
        return [None if "Hi" in c[0]["content"] else min(c[0]["content"].count("7"), 3) / 3 for c in completions]

    beta = 0.05
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        reward=sometimes_none,
        vimpo_actor_coeff=0.0,
        vimpo_value_loss_type="huber",
    )
    batch = _generation_batch(trainer, move_policy=0.3)
    targets = batch["vimpo_value_target"]
    assert torch.isnan(targets).any() and not torch.isnan(targets).all()

    mask = batch["completion_mask"].double()
    index = batch["completion_ids"][..., None]
    policy = full_softmax_log_probs(trainer.model, batch, trainer.temperature)
    ref = full_softmax_log_probs(trainer.ref_model, batch, trainer.temperature)
    logp, ref_logp = policy.gather(-1, index).squeeze(-1), ref.gather(-1, index).squeeze(-1)
    kl = (policy.exp() * (policy - ref)).sum(-1)
    values = (beta * (logp - ref_logp - kl) * mask).sum(-1)
    residuals = [float(v - t) for v, t in zip(values, targets.double(), strict=True)]
    finite = [r for r in residuals if not math.isnan(r)]
    delta = sorted(abs(r) for r in finite)[len(finite) // 2]  # half the rows in each branch
    trainer.args.vimpo_value_huber_delta = delta

    def huber(r: float) -> float:
        return 0.5 * r * r if abs(r) <= delta else delta * (abs(r) - 0.5 * delta)

    expected = sum(huber(r) for r in finite) / len(residuals)
    assert any(abs(r) > delta * 1.01 for r in finite) and any(abs(r) < delta * 0.99 for r in finite)
    loss = trainer._compute_loss(trainer.model, batch)
    assert loss.requires_grad
    assert math.isclose(loss.item(), expected, rel_tol=1e-5, abs_tol=1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# Candidate-set KL
# ----------------------------------------------------------------------------------------------------------------------


def _naive_candidate_set_kl(trainer, batch, topk: int) -> torch.Tensor:
    """float64 ``(B, C)``: per position, ``sum_{v in top-k of the policy} p (log p - log q)`` from full softmaxes."""
    policy = full_softmax_log_probs(trainer.model, batch, trainer.temperature)
    ref = full_softmax_log_probs(trainer.ref_model, batch, trainer.temperature)
    kl = torch.zeros(policy.shape[:2], dtype=torch.float64)
    for row in range(policy.size(0)):
        for position in range(policy.size(1)):
            candidates = sorted(range(policy.size(-1)), key=lambda v: -float(policy[row, position, v]))[:topk]
            kl[row, position] = sum(
                float(policy[row, position, v].exp() * (policy[row, position, v] - ref[row, position, v]))
                for v in candidates
            )
    return kl * batch["completion_mask"].double()


@pytest.mark.parametrize("topk", [1, 5, 10**6])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_candidate_set_kl_equals_a_naive_top_k_sum(topk, chunk_size, tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        temperature=0.7,
        vimpo_kl_estimator="candidate_set",
        vimpo_candidate_kl_topk=topk,
        vimpo_kl_chunk_size=chunk_size,
    )
    batch = _generation_batch(trainer, move_policy=0.3)
    scores = trainer._token_scores(trainer.model, batch)
    assert batch["completion_mask"].sum() > 0 and (batch["completion_mask"] == 0).any()  # ragged rows
    expected = _naive_candidate_set_kl(trainer, batch, topk)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(scores.token_kl.double(), expected, rtol=1e-4, atol=1e-6)
    assert not scores.token_kl.requires_grad and scores.logp.requires_grad
    if topk >= trainer.model.config.vocab_size:  # the whole vocabulary: the exact KL
        policy = full_softmax_log_probs(trainer.model, batch, 0.7)
        exact = (policy.exp() * (policy - full_softmax_log_probs(trainer.ref_model, batch, 0.7))).sum(-1)
        torch.testing.assert_close(scores.token_kl.double(), exact * batch["completion_mask"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["granite", "gemma2", "cohere"])
def test_candidate_set_kl_applies_each_family_logit_transform(family, tmp_path):
    """Granite's logits_scaling, Gemma 2's soft-cap and Cohere's logit_scale, then the temperature: the candidate
    set and its sum equal a float64 computation from the model's own forward().logits."""
    model_dir = save_tiny_family_model(tmp_path / family, family)
    trainer = build_trainer(
        "vimpo",
        model_dir,
        str(tmp_path / "run"),
        temperature=0.7,
        vimpo_kl_estimator="candidate_set",
        vimpo_candidate_kl_topk=5,
        vimpo_kl_chunk_size=7,
    )
    batch = _generation_batch(trainer, move_policy=0.05)
    scores = trainer._token_scores(trainer.model, batch)
    expected = _naive_candidate_set_kl(trainer, batch, 5)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(scores.token_kl.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cast_lm_head_to_fp32", [False, True])
def test_candidate_set_kl_over_the_whole_vocabulary_is_trls_exact_kl_in_bf16(
    cast_lm_head_to_fp32, tiny_model_dir, tmp_path
):
    """In bf16 the candidate set projects in the precision TRL's kernels do (bf16 tiles, or a float32 head): over
    the whole vocabulary it equals the exact KL of TRL's ChunkedDivergenceFunction to float32 rounding."""
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        model_init_kwargs={"dtype": "bfloat16"},
        cast_lm_head_to_fp32=cast_lm_head_to_fp32,
        vimpo_kl_estimator="candidate_set",
        vimpo_candidate_kl_topk=10**6,
        vimpo_kl_chunk_size=7,
    )
    batch = _generation_batch(trainer, move_policy=0.3)
    candidate_set = trainer._token_scores(trainer.model, batch).token_kl
    trainer.args.vimpo_kl_estimator = "exact"
    exact = trainer._token_scores(trainer.model, batch).token_kl
    assert exact.max() > 1e-3
    torch.testing.assert_close(candidate_set, exact, rtol=1e-3, atol=1e-5)


def test_candidate_set_kl_is_exactly_zero_at_the_reference_and_trains(tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "vimpo", tiny_model_dir, str(tmp_path), vimpo_kl_estimator="candidate_set", vimpo_candidate_kl_topk=4
    )
    batch = _generation_batch(trainer)
    assert trainer._token_scores(trainer.model, batch).token_kl.abs().max() == 0
    trainer.args.max_steps = 2
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "vimpo/kl" in entry]
    assert logged[0]["vimpo/kl"] == 0.0 and logged[1]["vimpo/kl"] != 0.0
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


# ----------------------------------------------------------------------------------------------------------------------
# Capped baseline
# ----------------------------------------------------------------------------------------------------------------------


def test_cap_v0_caps_the_group_mean_of_the_value_target(tiny_model_dir, tmp_path):
    def prompt_dependent(completions, prompts, **kwargs):
        # "What is a + b?": b / 10 on top of the completion's score, so that the two groups' means differ.
        return [
            min(c[0]["content"].count("7"), 3) / 3 + int(p[-1]["content"][-2]) / 10
            for c, p in zip(completions, prompts)
        ]

    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), reward=prompt_dependent)
    rewards = _generation_batch(trainer)["row_rewards"].tolist()
    means = [sum(rewards[g : g + 4]) / 4 for g in (0, 4)]
    assert means[0] != means[1]
    cap = sum(means) / 2  # caps one group, leaves the other
    trainer.args.vimpo_cap_v0 = cap
    batch = _generation_batch(trainer)
    assert batch["row_rewards"].tolist() == rewards
    expected = [r - min(means[i // 4], cap) for i, r in enumerate(rewards)]
    torch.testing.assert_close(batch["vimpo_value_target"], torch.tensor(expected), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Reference refresh
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "freq", "max_steps", "refresh_steps"),
    [
        (dict(), 2, 5, {2, 4}),  # one optimizer step per generation batch
        # 2 optimizer steps per generation batch of 4 groups: a refresh after every batch is every 2nd step.
        (dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4), 1, 4, {2, 4}),
    ],
    ids=["every-2nd-batch", "two-steps-per-batch"],
)
def test_reference_becomes_the_policy_exactly_at_the_refresh_steps(
    layout, freq, max_steps, refresh_steps, tiny_model_dir, tmp_path
):
    from transformers import TrainerCallback

    trainer = build_trainer(
        "vimpo", tiny_model_dir, str(tmp_path), vimpo_update_ref_freq=freq, max_steps=max_steps, **layout
    )
    parameters = lambda model: [p.detach().clone() for p in model.parameters()]  # noqa: E731
    history = [(parameters(trainer.model), parameters(trainer.ref_model))]

    class Record(TrainerCallback):  # added after TRL's SyncRefModelCallback, so it sees the refreshed reference
        def on_step_end(self, args, state, control, **kwargs):
            history.append((parameters(trainer.model), parameters(trainer.ref_model)))

    trainer.add_callback(Record())
    trainer.train()
    assert len(history) == max_steps + 1
    for step in range(1, max_steps + 1):
        policy, ref = history[step]
        previous_ref = history[step - 1][1]
        policy_moved = any(not torch.equal(p, q) for p, q in zip(policy, history[step - 1][0], strict=True))
        assert policy_moved, step
        if step in refresh_steps:
            assert all(torch.equal(p, r) for p, r in zip(policy, ref, strict=True)), step
        else:
            assert all(torch.equal(r, q) for r, q in zip(ref, previous_ref, strict=True)), step
            assert any(not torch.equal(p, r) for p, r in zip(policy, ref, strict=True)), step
    if not layout:  # one micro-batch per step: the step after a refresh starts at KL exactly 0
        kl = {entry["step"]: entry["vimpo/kl"] for entry in trainer.state.log_history if "vimpo/kl" in entry}
        assert kl[1] == 0.0 and kl[3] == 0.0 and kl[2] != 0.0 and kl[4] != 0.0


def test_reference_refresh_is_refused_with_peft(tiny_model_dir, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"^vimpo_update_ref_freq=1 .*PEFT"):
        build_trainer(
            "vimpo", tiny_model_dir, str(tmp_path), trainer_kwargs=dict(peft_config=lora), vimpo_update_ref_freq=1
        )
