"""VIMPO's adaptive actor coefficient (``vimpo_adaptive_actor_coeff``, the official ``compute_vimpo_adaptive_actor_coeff``):
the pure RMS and EMA math against naive float64 loops, the policy's ``sum_v p_v^2`` against a float64 full softmax,
the trainer's analytic logit-gradient RMS against autograd through a naive float64 reimplementation of both losses on
the model's own logits, the loss it composes, its EMA state, and the refusals."""

import json
import math

import pytest
import torch
from conftest import assert_refused_with_field_and_fix, assert_same_update, run_two_processes
from trainer_harness import (
    build_trainer,
    full_softmax_log_probs,
    moved_policy_batch,
    parameter_update,
    start_training,
)

from gnivo_trl import VIMPOConfig
from gnivo_trl.group_bookkeeping import loss_mask
from gnivo_trl.losses import (
    adaptive_actor_coeff,
    logit_gradient_norm_factors,
    logit_gradient_rms_terms,
    vimpo_value_loss_from_residuals,
    vimpo_value_residual_gradient,
)
from gnivo_trl.vimpo_trainer import ACTOR_BALANCE_WARNING_THRESHOLD

CONFIG = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")
METRICS = (
    "vimpo/value_logit_grad_rms",
    "vimpo/actor_logit_grad_rms_unscaled",
    "vimpo/actor_logit_grad_rms",
    "vimpo/adaptive_actor_ema_value_logit_grad_rms",
    "vimpo/adaptive_actor_ema_actor_logit_grad_rms_unscaled",
    "vimpo/actor_coeff",
    "vimpo/actor_to_value_logit_grad_rms_ratio",
)


# ----------------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------------


def test_logit_gradient_rms_terms_equal_a_naive_loop():
    torch.manual_seed(0)
    B, T, V = 3, 5, 11
    logits = 3.0 * torch.randn(B, T, V, dtype=torch.float64)
    probs = logits.softmax(-1)
    labels = torch.randint(V, (B, T))
    mask = torch.rand(B, T) > 0.3
    coefficients = torch.randn(B, T, dtype=torch.float64)
    coefficients[~mask] = float("nan")  # masked positions may hold anything
    logp = probs.log().gather(-1, labels[..., None]).squeeze(-1)
    factors = logit_gradient_norm_factors(logp.float(), probs.square().sum(-1).float())
    total, count = logit_gradient_rms_terms(coefficients.float(), factors, mask.float()).tolist()

    expected_total, expected_count = 0.0, 0
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                gradient = coefficients[i, t] * (torch.nn.functional.one_hot(labels[i, t], V) - probs[i, t])
                expected_total += float(gradient.square().sum())
                expected_count += 1
    assert count == expected_count
    assert math.sqrt(total / count) == pytest.approx(math.sqrt(expected_total / expected_count), rel=1e-5)


def test_adaptive_actor_coeff_is_an_ema_without_bias_correction_that_skips_actorless_micro_batches():
    alpha, decay, eps = 0.15, 0.8, 1e-12
    sequence = [(2.0, 0.5), (1.0, 0.0), (3.0, 1.5), (0.5, -1.0), (4.0, 0.25)]
    value_ema = actor_ema = 0.0
    expected_value = expected_actor = 0.0
    for step, (value_rms, actor_rms) in enumerate(sequence):
        coeff, value_ema, actor_ema = adaptive_actor_coeff(
            value_ema, actor_ema, value_rms, actor_rms, alpha, decay, eps
        )
        if actor_rms > 0:
            expected_value = decay * expected_value + (1 - decay) * value_rms
            expected_actor = decay * expected_actor + (1 - decay) * actor_rms
            expected_coeff = alpha * expected_value / (expected_actor + eps)
        else:
            expected_coeff = 0.0
        assert (coeff, value_ema, actor_ema) == pytest.approx((expected_coeff, expected_value, expected_actor))
        if step == 0:  # no bias correction: the first average is (1 - d) times the first RMS
            assert value_ema == pytest.approx((1 - decay) * 2.0) and coeff == pytest.approx(alpha * 2.0 / 0.5)
    assert adaptive_actor_coeff(1.0, 2.0, 5.0, 0.0, alpha, decay, eps) == (0.0, 1.0, 2.0)


@pytest.mark.parametrize("loss_type", ["squared_error", "huber"])
def test_value_residual_gradient_is_the_value_loss_derivative(loss_type):
    residuals = torch.tensor([-2.0, -0.3, -0.01, 0.0, 0.2, 0.7, 5.0], requires_grad=True)
    (expected,) = torch.autograd.grad(vimpo_value_loss_from_residuals(residuals, loss_type, 0.5).sum(), residuals)
    torch.testing.assert_close(vimpo_value_residual_gradient(residuals, loss_type, 0.5), expected)


# ----------------------------------------------------------------------------------------------------------------------
# sum_v p_v^2 of the policy
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_probability_square_sums_equal_a_full_softmax(temperature, tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "vimpo", tiny_model_dir, str(tmp_path), temperature=temperature, vimpo_adaptive_actor_coeff=True
    )
    batch = moved_policy_batch(trainer, seed=0)
    valid = batch["completion_mask"].bool()
    expected = full_softmax_log_probs(trainer.model, batch, temperature).mul(2).exp().sum(-1)
    assert expected[valid].max() - expected[valid].min() > 1e-3  # the distributions differ between positions

    # Read off the policy's own fused-head pass (TRL's log_sum_sq_probs output), not a second head projection.
    scores = trainer._token_scores(trainer.model, batch)
    assert scores.probability_square_sums.dtype == torch.float32 and not scores.probability_square_sums.requires_grad
    torch.testing.assert_close(scores.probability_square_sums.double(), expected * valid, rtol=1e-5, atol=1e-7)
    trainer.args.vimpo_adaptive_actor_coeff = False
    assert trainer._token_scores(trainer.model, batch).probability_square_sums is None


# ----------------------------------------------------------------------------------------------------------------------
# The trainer's logit-gradient RMS against autograd on the logits
# ----------------------------------------------------------------------------------------------------------------------


def _naive_logit_gradient_rms(trainer, batch, advantages, temperature, estimator, loss_type, delta, dual_clip):
    """RMS over the valid positions of ``||dL/dz||_2``, ``z`` the model's own tempered ``(B, C, V)`` logits, for a
    naive float64 value loss and actor loss (weight 1, token mean over the micro-batch); also returns the naive
    residuals and ratios so that the caller can check which branches the batch exercises."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    C = batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -C - 1 : -1].double()
    z = (logits / temperature).requires_grad_()
    log_probs = z.log_softmax(-1)
    labels = batch["completion_ids"][..., None]
    logp = log_probs.gather(-1, labels).squeeze(-1)
    ref_log_probs = full_softmax_log_probs(trainer.ref_model, batch, temperature)
    ref_logp = ref_log_probs.gather(-1, labels).squeeze(-1)
    if estimator == "exact":
        kl = (log_probs.exp() * (log_probs - ref_log_probs)).sum(-1).detach()
    else:  # k3
        log_ratio = (logp - ref_logp).detach()
        kl = torch.expm1(-log_ratio) + log_ratio
    mask = loss_mask(batch).double()
    B = mask.size(0)
    weights = batch["importance_sampling_ratio"].reshape(-1).double()

    beta = trainer.args.vimpo_beta
    residuals = beta * (mask * (logp - ref_logp - kl)).sum(1) - batch["vimpo_value_target"].double()
    if loss_type == "squared_error":
        per_row = 0.5 * residuals.square()
    else:
        per_row = torch.where(
            residuals.abs() <= delta, 0.5 * residuals.square(), delta * (residuals.abs() - delta / 2)
        )
    value_loss = per_row.sum() / B  # vLLM's importance ratio weights the actor only (the official code)

    old = batch["old_per_token_logps"].double()
    A = advantages.double()
    ratio = torch.exp(logp - old)
    per_token = torch.maximum(-A * ratio, -A * ratio.clamp(1 - 0.2, 1 + 0.28))
    per_token = torch.where(A < 0, torch.minimum(per_token, -A * dual_clip), per_token)
    actor_loss = (mask * per_token * weights[:, None]).sum() / mask.sum()

    def rms(loss):
        (gradient,) = torch.autograd.grad(loss, z, retain_graph=True)
        return float(((gradient.norm(dim=-1).square() * mask).sum() / mask.sum()).sqrt())

    return rms(value_loss), rms(actor_loss), residuals.detach(), ratio.detach()


@pytest.mark.parametrize(
    ("loss_type", "temperature", "estimator"), [("squared_error", 1.0, "exact"), ("huber", 0.7, "k3")]
)
def test_logit_gradient_rms_equals_autograd_through_naive_losses(
    loss_type, temperature, estimator, tiny_model_dir, tmp_path
):
    """The key check: the analytic ``|dL/dlog p_y| * sqrt(1 - 2 p_y + sum p^2)`` RMS of the trainer equals the RMS of
    the autograd gradient of each loss with respect to the logits, with PPO clipping, the dual clip, importance
    ratios and (for Huber) clamped residuals all active in the micro-batch."""
    delta, dual_clip = 0.6, 1.5
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        temperature=temperature,
        vimpo_kl_estimator=estimator,
        vimpo_value_loss_type=loss_type,
        vimpo_value_huber_delta=delta,
        vimpo_dual_clip=dual_clip,
        vimpo_adaptive_actor_coeff=True,
    )
    batch = moved_policy_batch(trainer, seed=0)
    mask = loss_mask(batch)
    with torch.no_grad():
        logp = trainer._token_scores(trainer.model, batch).logp
    generator = torch.Generator().manual_seed(1)
    batch["old_per_token_logps"] = logp - 0.6 * torch.randn(logp.shape, generator=generator)
    batch["importance_sampling_ratio"] = 0.5 + torch.rand(logp.size(0), 1, generator=generator)
    captured = {}
    whitened_advantages = trainer._whitened_advantages

    def capture(scores, mask, mode):
        captured["advantages"] = whitened_advantages(scores, mask, mode)
        return captured["advantages"]

    trainer._whitened_advantages = capture
    trainer._compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]

    value_rms, actor_rms, residuals, ratio = _naive_logit_gradient_rms(
        trainer, batch, captured["advantages"], temperature, estimator, loss_type, delta, dual_clip
    )
    valid, A = mask.bool(), captured["advantages"]
    assert ((ratio > 1.28) & (A > 0) & valid).any() and ((ratio < 0.8) & (A < 0) & valid).any()  # clipped
    assert ((ratio > dual_clip) & (A < 0) & valid).any()  # dual-clipped
    if loss_type == "huber":
        assert (residuals.abs() > delta).any() and (residuals.abs() < delta).any()
    assert value_rms > 0 and actor_rms > 0
    assert metrics["vimpo/value_logit_grad_rms"][-1] == pytest.approx(value_rms, rel=1e-4)
    assert metrics["vimpo/actor_logit_grad_rms_unscaled"][-1] == pytest.approx(actor_rms, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The loss, the EMA state and the metrics
# ----------------------------------------------------------------------------------------------------------------------


def test_loss_uses_the_adaptive_coefficient_and_updates_the_emas(tiny_model_dir, tmp_path):
    alpha, decay, eps = 0.15, 0.9, 1e-12
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        gradient_accumulation_steps=2,
        vimpo_adaptive_actor_coeff=True,
        vimpo_adaptive_actor_alpha=alpha,
    )
    batch = moved_policy_batch(trainer, seed=0)
    metrics = trainer._metrics["train"]
    with torch.no_grad():
        adaptive = trainer._compute_loss(trainer.model, batch)
    assert all(len(metrics[name]) == 1 for name in METRICS)
    value_rms, actor_rms = metrics["vimpo/value_logit_grad_rms"][0], metrics["vimpo/actor_logit_grad_rms_unscaled"][0]
    coeff = metrics["vimpo/actor_coeff"][0]
    assert value_rms > 0 and actor_rms > 0
    assert (trainer._adaptive_value_rms_ema, trainer._adaptive_actor_rms_ema) == pytest.approx(
        ((1 - decay) * value_rms, (1 - decay) * actor_rms)
    )
    assert coeff == pytest.approx(alpha * (1 - decay) * value_rms / ((1 - decay) * actor_rms + eps), rel=1e-12)
    assert coeff == pytest.approx(alpha * value_rms / actor_rms, rel=1e-9)
    assert metrics["vimpo/actor_logit_grad_rms"][0] == pytest.approx(coeff * actor_rms)
    assert metrics["vimpo/actor_to_value_logit_grad_rms_ratio"][0] == pytest.approx(coeff * actor_rms / value_rms)

    # The same micro-batch with fixed weights 0 and 1 gives the value loss and the actor loss. The batch is a whole
    # generation batch, normalised as one of its steps_per_generation micro-batches per accumulation step is.
    trainer.args.vimpo_adaptive_actor_coeff = False
    with torch.no_grad():
        trainer.args.vimpo_actor_coeff = 0.0
        value_only = trainer._compute_loss(trainer.model, batch)
        trainer.args.vimpo_actor_coeff = 1.0
        actor_loss = trainer._compute_loss(trainer.model, batch) - value_only
    per_micro_batch = trainer.args.steps_per_generation / trainer.args.gradient_accumulation_steps
    assert float(value_only) == pytest.approx(metrics["vimpo/value_loss"][-1] * per_micro_batch, rel=1e-6)
    assert float(actor_loss) != 0
    torch.testing.assert_close(adaptive, value_only + coeff * actor_loss, rtol=1e-6, atol=1e-9)
    assert len(metrics["vimpo/actor_coeff"]) == 1  # only while the option is on

    # The next micro-batch updates both averages (same RMS again) and uses the new ratio.
    trainer.args.vimpo_adaptive_actor_coeff = True
    with torch.no_grad():
        trainer._compute_loss(trainer.model, batch)
    value_ema = decay * (1 - decay) * value_rms + (1 - decay) * metrics["vimpo/value_logit_grad_rms"][1]
    actor_ema = decay * (1 - decay) * actor_rms + (1 - decay) * metrics["vimpo/actor_logit_grad_rms_unscaled"][1]
    assert trainer._adaptive_value_rms_ema == pytest.approx(value_ema)
    assert trainer._adaptive_actor_rms_ema == pytest.approx(actor_ema)
    assert metrics["vimpo/actor_coeff"][1] == pytest.approx(alpha * value_ema / (actor_ema + eps))

    # Evaluation uses the current coefficient and leaves the averages alone.
    trainer.model.eval()
    emas = (trainer._adaptive_value_rms_ema, trainer._adaptive_actor_rms_ema)
    with torch.no_grad():
        trainer._compute_loss(trainer.model, batch)
    assert (trainer._adaptive_value_rms_ema, trainer._adaptive_actor_rms_ema) == emas  # untouched: the same floats
    assert trainer._metrics["eval"]["vimpo/actor_coeff"] == [pytest.approx(alpha * value_ema / (actor_ema + eps))]


def test_micro_batch_without_actor_gradient_gets_coefficient_zero_and_keeps_the_emas(tiny_model_dir, tmp_path):
    """While the policy is the reference every advantage is exactly 0: the actor RMS is 0, the coefficient 0 and the
    averages stay as they were; training goes on and the second step (policy moved) gets a positive coefficient."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), vimpo_adaptive_actor_coeff=True)
    start_training(trainer)
    batch = trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(2)).repeat(4)))
    trainer._adaptive_value_rms_ema, trainer._adaptive_actor_rms_ema = 0.3, 0.7
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    assert metrics["vimpo/actor_logit_grad_rms_unscaled"] == [0.0]
    assert metrics["vimpo/value_logit_grad_rms"][0] > 0
    assert metrics["vimpo/actor_coeff"] == [0.0]
    assert (trainer._adaptive_value_rms_ema, trainer._adaptive_actor_rms_ema) == (0.3, 0.7)
    assert float(loss) == pytest.approx(metrics["vimpo/value_loss"][0], rel=1e-6)

    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), max_steps=2, vimpo_adaptive_actor_coeff=True)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "vimpo/actor_coeff" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry[name]) for entry in logs for name in METRICS)
    assert logs[0]["vimpo/actor_coeff"] == 0.0 and logs[1]["vimpo/actor_coeff"] > 0
    assert logs[1]["vimpo/actor_coeff"] == pytest.approx(
        0.025 * logs[1]["vimpo/value_logit_grad_rms"] / (logs[1]["vimpo/actor_logit_grad_rms_unscaled"]), rel=1e-5
    )


@pytest.mark.distributed
def test_two_processes_reduce_the_sums_of_squares_and_token_counts(tiny_model_dir, tmp_path):
    """Long completions on rank 0, one-token ones on rank 1: the RMS is the root of the summed squares over the summed
    token counts (not a mean of per-rank RMS). At step 1 (policy = reference) the residuals and factors are those of
    one process holding all 8 rows, whose value coefficients carry 1 / 8 instead of 1 / 4: exactly half the RMS. The
    actor RMS is 0 there, so both layouts take the value-only update."""
    layout = dict(long_then_short=True, vimpo_adaptive_actor_coeff=True)
    saved = run_two_processes(
        "vimpo", tiny_model_dir, tmp_path, json.dumps(dict(layout, per_device_train_batch_size=4))
    )
    single = build_trainer("vimpo", tiny_model_dir, str(tmp_path / "single"), **layout)
    assert_same_update(saved["update"], parameter_update(single))
    logged = single.state.log_history[0]
    assert logged["vimpo/value_logit_grad_rms"] > 0 and saved["metrics"]["vimpo/actor_coeff"] == 0.0
    assert saved["metrics"]["vimpo/value_logit_grad_rms"] == pytest.approx(
        2 * logged["vimpo/value_logit_grad_rms"], rel=1e-5
    )


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


def test_defaults_are_off_with_the_run_scripts_values():
    config = VIMPOConfig(**CONFIG)
    assert config.vimpo_adaptive_actor_coeff is False
    assert (config.vimpo_adaptive_actor_alpha, config.vimpo_adaptive_actor_ema_decay) == (0.025, 0.9)
    assert config.vimpo_adaptive_actor_eps == 1e-12
    VIMPOConfig(**CONFIG, vimpo_adaptive_actor_alpha=0.0, vimpo_adaptive_actor_ema_decay=0.0)  # both bounds allowed


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(vimpo_adaptive_actor_alpha=-0.1), "vimpo_adaptive_actor_alpha"),
        (dict(vimpo_adaptive_actor_alpha=math.inf), "vimpo_adaptive_actor_alpha"),
        (dict(vimpo_adaptive_actor_alpha=math.nan), "vimpo_adaptive_actor_alpha"),
        (dict(vimpo_adaptive_actor_ema_decay=1.0), "vimpo_adaptive_actor_ema_decay"),
        (dict(vimpo_adaptive_actor_ema_decay=-0.1), "vimpo_adaptive_actor_ema_decay"),
        (dict(vimpo_adaptive_actor_eps=0.0), "vimpo_adaptive_actor_eps"),
        (dict(vimpo_adaptive_actor_eps=-1e-12), "vimpo_adaptive_actor_eps"),
        (dict(vimpo_adaptive_actor_eps=math.inf), "vimpo_adaptive_actor_eps"),
    ],
)
def test_bad_adaptive_actor_settings_are_refused_with_field_and_fix(overrides, field):
    assert_refused_with_field_and_fix(VIMPOConfig, field, **CONFIG, vimpo_adaptive_actor_coeff=True, **overrides)


@pytest.mark.parametrize(
    "overrides, warns",
    [
        (dict(vimpo_beta=5e-4, vimpo_actor_coeff=5e-3), True),  # the paper's defaults on short completions
        (dict(vimpo_beta=5e-4, vimpo_actor_coeff=5e-3, vimpo_adaptive_actor_coeff=True), False),
        (dict(vimpo_beta=5e-4, vimpo_actor_coeff=0.0), False),  # value only
        (dict(vimpo_beta=1.0, vimpo_actor_coeff=5e-3), False),
    ],
)
def test_a_dominating_fixed_actor_weight_is_warned_about_once(tiny_model_dir, tmp_path, caplog, overrides, warns):
    """The balance ``vimpo_beta * L / vimpo_actor_coeff`` is measured on the first training micro-batch (``L`` its
    mean completion length) and warned about once, with the numbers and the fixes."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), **overrides)
    batch = moved_policy_batch(trainer, seed=0)
    mask = loss_mask(batch)
    mean_length = float(mask.sum() / (mask.sum(dim=1) > 0).sum())
    with caplog.at_level("WARNING", logger="gnivo_trl.vimpo_trainer"), torch.no_grad():
        trainer._compute_loss(trainer.model, batch)
        trainer._compute_loss(trainer.model, batch)
    messages = [record.getMessage() for record in caplog.records if "dominate" in record.getMessage()]
    assert len(messages) == (1 if warns else 0)
    if warns:
        balance = overrides["vimpo_beta"] * mean_length / overrides["vimpo_actor_coeff"]
        assert f"{balance:.3g}" in messages[0]
        # the length from which these weights are balanced, computed (the paper's defaults: 200 tokens)
        balanced_length = ACTOR_BALANCE_WARNING_THRESHOLD * overrides["vimpo_actor_coeff"] / overrides["vimpo_beta"]
        assert f"completions of {balanced_length:.0f} tokens or more" in messages[0]
        assert "vimpo_adaptive_actor_coeff=True" in messages[0] and "Raise vimpo_beta" in messages[0]
