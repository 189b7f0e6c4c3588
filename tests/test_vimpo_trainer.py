"""VIMPOTrainer: layout-independent gradients (SPEC invariant 2), the reference model, the trainer's exact KL,
end-to-end training, refusals and metrics."""

import json
import math

import pytest
import torch
from conftest import assert_same_update, max_difference, max_magnitude, run_two_processes
from trainer_harness import build_trainer, parameter_update
from trl import GRPOConfig, GRPOTrainer

from gnivo_trl import VIMPOConfig, VIMPOTrainer
from gnivo_trl.group_bookkeeping import loss_mask

# Two optimizer steps over 2 groups of K=4 (8 rows). At step 1 the policy equals the reference, so rho - kappa = 0 and
# only the value loss acts; step 2 exercises the KL, the advantages, their whitening and the actor loss.
SINGLE_PROCESS_LAYOUTS = {
    "one micro-batch": dict(per_device_train_batch_size=8),
    "accumulation, whole groups": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
    "accumulation, split groups": dict(per_device_train_batch_size=2, gradient_accumulation_steps=4),
}
# Two generation rounds per optimizer step: the actor's whitening and token mean are per generation batch (as TRL's
# own advantage normalisation), so only the value loss is layout-independent there.
SEVERAL_GENERATIONS_PER_STEP = dict(
    per_device_train_batch_size=2, gradient_accumulation_steps=4, steps_per_generation=2
)


@pytest.fixture(scope="module")
def reference_update(tiny_model_dir, tmp_path_factory):
    cache = {}

    def get(**extra):
        extra.setdefault("num_generations", 4)
        key = tuple(sorted(extra.items()))
        if key not in cache:
            settings = dict(per_device_train_batch_size=8, num_generations=4)
            settings.update(extra)
            trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path_factory.mktemp("ref")), **settings)
            cache[key] = parameter_update(trainer)
        return cache[key]

    return get


@pytest.mark.parametrize("estimator", ["exact", "k3"])
@pytest.mark.parametrize("layout", list(SINGLE_PROCESS_LAYOUTS))
def test_two_step_update_does_not_depend_on_layout(layout, estimator, tiny_model_dir, tmp_path, reference_update):
    extra = dict(max_steps=2, vimpo_kl_estimator=estimator)
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), **SINGLE_PROCESS_LAYOUTS[layout], **extra)
    update = parameter_update(trainer)
    assert_same_update(update, reference_update(**extra))
    step_two = [entry for entry in trainer.state.log_history if entry.get("step") == 2 and "vimpo/kl" in entry][0]
    assert step_two["vimpo/kl"] > 0 and step_two["vimpo/advantage_std"] > 0  # the actor path was live


def test_value_only_update_does_not_depend_on_generation_rounds(tiny_model_dir, tmp_path, reference_update):
    extra = dict(max_steps=2, vimpo_actor_coef=0.0)
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), **SEVERAL_GENERATIONS_PER_STEP, **extra)
    assert_same_update(parameter_update(trainer), reference_update(**extra))


def test_actor_whitening_is_per_generation_batch(tiny_model_dir, tmp_path, reference_update):
    # Documented behaviour, checked so that a change is noticed: with several generation rounds per optimizer step the
    # actor term differs from the one-micro-batch update (each round whitens its own advantages).
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), **SEVERAL_GENERATIONS_PER_STEP, max_steps=2)
    assert max_difference(parameter_update(trainer), reference_update(max_steps=2)) > 1e-4


def test_lambda_below_one_does_not_depend_on_layout(tiny_model_dir, tmp_path, reference_update):
    extra = dict(max_steps=2, vimpo_gae_lambda=0.95)
    trainer = build_trainer(
        "vimpo", tiny_model_dir, str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4, **extra
    )
    update = parameter_update(trainer)
    assert_same_update(update, reference_update(**extra))
    assert max_difference(update, reference_update(max_steps=2)) > 1e-6  # lambda reaches the update


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        dict(per_device_train_batch_size=4),  # one whole group per process
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=2),  # groups split over micro-batches
        # One group of K=8 whose rows straddle the two processes: targets, whitening and the token mean are global.
        dict(per_device_train_batch_size=4, num_generations=8),
    ],
    ids=["whole-groups", "split-micro-batches", "straddling-processes"],
)
def test_two_processes_match_one_process(layout, tiny_model_dir, tmp_path, reference_update):
    saved = run_two_processes("vimpo", tiny_model_dir, tmp_path, json.dumps(dict(layout, max_steps=2)))
    assert_same_update(
        saved["update"], reference_update(max_steps=2, num_generations=layout.get("num_generations", 4))
    )
    assert math.isfinite(saved["metrics"]["vimpo/value_loss"])


def test_reference_is_the_frozen_initial_model_and_grpo_kl_stays_off(tiny_model_dir, tmp_path):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), max_steps=2)
    assert trainer.ref_model is not None
    assert trainer.beta == 0.0 and trainer.args.beta == 0.0
    initial = {name: p.detach().clone() for name, p in trainer.ref_model.named_parameters()}
    update = parameter_update(trainer)
    assert max_magnitude(update) > 0
    for name, p in trainer.ref_model.named_parameters():
        assert torch.equal(p, initial[name]), name
    assert not any("kl" in entry for entry in trainer.state.log_history)  # GRPO's own KL metric never appears


# Layouts that score a generation batch in the two ways VIMPOTrainer has: the policy's side of the scores from the
# loss-time forward (one micro-batch holds the generation batch: TRL's default), or from a scoring pass at generation
# time (gradient accumulation over micro-batches, whose advantages must all be whitened before the first micro-step).
SCORING_PATHS = {
    "loss forward": dict(per_device_train_batch_size=8),
    "scoring pass": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
}


def _start_training(trainer) -> None:
    """What Trainer's loop sets before scoring and loss steps: training mode and the accumulation count."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps


def _moved_policy_batch(trainer):
    """Scores one training generation batch after moving the policy away from the reference (so that KL and rho are
    not 0)."""
    _start_training(trainer)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(2)).repeat(4)))


def _scores(trainer, batch) -> dict:
    """The batch's ``vimpo_ref_logps``, ``vimpo_token_kl`` and ``vimpo_advantages``: attached at scoring time, or
    computed by the loss step (run here) when the policy's side comes from the loss-time forward."""
    if "vimpo_advantages" in batch:
        return batch
    assert "vimpo_token_kl" not in batch
    seen = {}
    loss_scores = trainer._loss_scores

    def record(*args, **kwargs):
        seen.update(loss_scores(*args, **kwargs))
        return seen

    trainer._loss_scores = record
    try:
        trainer._compute_loss(trainer.model, batch)
    finally:
        del trainer._loss_scores
    return seen


def _sequences(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(prompt + completion ids, their attention mask, number of completion positions)`` of a scored batch."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return ids, attention, batch["completion_ids"].size(1)


def _full_softmax_log_probs(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """float64 log-softmax of a model's full logits at the positions that predict the completion tokens."""
    ids, attention, C = _sequences(batch)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -C - 1 : -1].double()
    return (logits / temperature).log_softmax(-1)


@pytest.mark.parametrize("path", list(SCORING_PATHS))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_trainer_exact_kl_equals_full_softmax_kl(temperature, chunk_size, path, tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        temperature=temperature,
        vimpo_kl_chunk_size=chunk_size,
        **SCORING_PATHS[path],
    )
    batch = _moved_policy_batch(trainer)
    scores = _scores(trainer, batch)
    mask = loss_mask(batch)
    assert mask.sum() > 0 and (mask == 0).any()  # ragged rows

    policy_log_probs = _full_softmax_log_probs(trainer.model, batch, temperature)
    ref_log_probs = _full_softmax_log_probs(trainer.ref_model, batch, temperature)
    expected_kl = (policy_log_probs.exp() * (policy_log_probs - ref_log_probs)).sum(-1) * mask
    expected_ref = ref_log_probs.gather(-1, batch["completion_ids"][..., None]).squeeze(-1) * mask

    assert expected_kl.max() > 1e-3
    torch.testing.assert_close(scores["vimpo_token_kl"].double(), expected_kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores["vimpo_ref_logps"].double(), expected_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", list(SCORING_PATHS))
@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_sampled_kl_estimators_use_both_models_sampled_log_probs(estimator, path, tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        temperature=0.7,
        vimpo_kl_estimator=estimator,
        **SCORING_PATHS[path],
    )
    batch = _moved_policy_batch(trainer)
    scores = _scores(trainer, batch)
    mask = loss_mask(batch)
    index = batch["completion_ids"][..., None]
    policy = _full_softmax_log_probs(trainer.model, batch, 0.7).gather(-1, index).squeeze(-1)
    ref = _full_softmax_log_probs(trainer.ref_model, batch, 0.7).gather(-1, index).squeeze(-1)
    log_ratio = policy - ref
    expected = 0.5 * log_ratio.square() if estimator == "k2" else torch.expm1(-log_ratio) + log_ratio
    assert (expected * mask).max() > 1e-3
    torch.testing.assert_close(scores["vimpo_token_kl"].double(), expected * mask, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores["vimpo_ref_logps"].double(), ref * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["exact", "k2", "k3"])
@pytest.mark.parametrize("setting", ["loss forward", "scoring pass", "old log-probs"])
def test_each_model_runs_one_forward_per_step(estimator, setting, tiny_model_dir, tmp_path):
    """Backbone forwards (rows) of each model while a generation batch is scored and while its loss step runs.

    In TRL's default layout the policy's scores come from the loss-time forward: scoring runs only the reference, as
    GRPO with beta > 0 does. With gradient accumulation a scoring pass runs the policy too. With num_iterations=2 TRL
    computes old log-probs at scoring time (as with vLLM's importance sampling): VIMPO answers that forward with its
    own scoring pass instead of adding a second policy forward, and the old log-probs it returns are TRL's."""
    layout = {
        "loss forward": SCORING_PATHS["loss forward"],
        "scoring pass": SCORING_PATHS["scoring pass"],
        "old log-probs": dict(per_device_train_batch_size=8, num_iterations=2),
    }[setting]
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), vimpo_kl_estimator=estimator, **layout)
    rows = {"policy": 0, "reference": 0}

    def counter(name):
        def hook(module, args, kwargs, output):
            rows[name] += kwargs["input_ids"].size(0) if "input_ids" in kwargs else args[0].size(0)

        return hook

    trainer.model.model.register_forward_hook(counter("policy"), with_kwargs=True)
    trainer.ref_model.model.register_forward_hook(counter("reference"), with_kwargs=True)
    batch = _moved_policy_batch(trainer)
    num_rows = batch["completion_ids"].size(0)
    scoring_policy_rows = 0 if setting == "loss forward" else num_rows
    assert rows == {"policy": scoring_policy_rows, "reference": num_rows}
    trainer._compute_loss(trainer.model, batch)
    assert rows == {"policy": scoring_policy_rows + num_rows, "reference": num_rows}
    assert ("old_per_token_logps" in batch) == (setting == "old log-probs")
    if setting == "old log-probs":
        mask = loss_mask(batch)
        ids, attention, C = _sequences(batch)
        with torch.no_grad():
            trl_old, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, attention, C)
        torch.testing.assert_close(batch["old_per_token_logps"] * mask, trl_old * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["exact", "k3"])
def test_loss_forward_scores_equal_scoring_pass_scores(estimator, tiny_model_dir, tmp_path):
    """On one batch, the scores taken from the loss-time forward equal those of a scoring pass (whose own policy
    forward they replace), advantages included."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), vimpo_kl_estimator=estimator)
    batch = _moved_policy_batch(trainer)
    loss_forward = _scores(trainer, batch)
    mask = loss_mask(batch)
    with torch.no_grad():
        statistics = trainer._sampled_token_statistics(batch, mask, 8)
    scoring_pass = trainer._actor_scores(*statistics, mask, batch["vimpo_value_target"], "train")
    assert scoring_pass["vimpo_advantages"].abs().max() > 0.5
    for name in ("vimpo_ref_logps", "vimpo_token_kl", "vimpo_advantages"):
        torch.testing.assert_close(loss_forward[name], scoring_pass[name], rtol=1e-5, atol=1e-5)


def test_unmoved_policy_has_exactly_zero_advantages_in_the_loss_forward(tiny_model_dir, tmp_path):
    """While the policy is the reference, rho - kappa is exactly 0 (not rounding noise that whitening would blow up to
    unit scale): the loss-time scores take both models' log-probs from the same computation."""
    for estimator in ("exact", "k3"):
        trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), vimpo_kl_estimator=estimator)
        _start_training(trainer)
        batch = trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(2)).repeat(4)))
        scores = _scores(trainer, batch)
        assert loss_mask(batch).sum() > 0
        assert scores["vimpo_token_kl"].abs().max() == 0, estimator
        assert scores["vimpo_advantages"].abs().max() == 0, estimator


def test_loss_forward_refuses_a_model_whose_backbone_it_cannot_see(tiny_model_dir, tmp_path):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path))
    batch = _moved_policy_batch(trainer)
    logp = torch.zeros_like(batch["completion_mask"], dtype=torch.float32, requires_grad=True)
    trainer._policy_token_logps = lambda model, inputs: (logp, torch.zeros_like(logp))  # no backbone forward
    with pytest.raises(RuntimeError, match="one policy backbone forward"):
        trainer._compute_loss(trainer.model, batch)


def test_value_targets_are_group_centred_raw_rewards(tiny_model_dir, tmp_path):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path))
    batch = trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(2)).repeat(4)))
    rewards = batch["row_rewards"].reshape(-1, 4)
    expected = (rewards - rewards.mean(dim=1, keepdim=True)).reshape(-1)  # no std scaling
    torch.testing.assert_close(batch["vimpo_value_target"], expected)
    assert rewards.std(dim=1).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("actor_coef", [0.0, 5e-3])
@pytest.mark.parametrize("estimator", ["exact", "k2", "k3"])
def test_trains_end_to_end(estimator, actor_coef, tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        vimpo_kl_estimator=estimator,
        vimpo_actor_coef=actor_coef,
        vimpo_beta=5e-4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1.0,
    )
    update = parameter_update(trainer)
    assert all(value.abs().max() > 0 for value in update.values()), "every parameter tensor changes"
    logs = [entry for entry in trainer.state.log_history if "vimpo/value_loss" in entry]
    assert len(logs) >= 4
    for entry in logs:
        for name in ("loss", "vimpo/value_loss", "vimpo/actor_loss", "vimpo/residual_mean", "vimpo/residual_std"):
            assert math.isfinite(entry[name]), (name, entry)
        assert entry["vimpo/kl"] >= 0


def test_actor_coefficient_changes_the_update(tiny_model_dir, tmp_path, reference_update):
    # Value-only (c_A = 0) and the default mix differ once the advantages are non-zero (step 2).
    value_only = build_trainer("vimpo", tiny_model_dir, str(tmp_path), max_steps=2, vimpo_actor_coef=0.0)
    assert max_difference(parameter_update(value_only), reference_update(max_steps=2)) > 1e-4


@pytest.mark.slow
def test_trains_with_real_generation(tiny_model_dir, tmp_path):
    """The unstubbed path: the tiny model samples its own completions."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), max_steps=2, learning_rate=0.05)
    from trl import GRPOTrainer

    trainer._generate_single_turn = GRPOTrainer._generate_single_turn.__get__(trainer)
    update = parameter_update(trainer)
    assert all(value.abs().max() > 0 for value in update.values())


def test_rows_without_reward_are_left_out(tiny_model_dir, tmp_path):
    def sometimes_none(completions, **kwargs):
        return [None if "Hi" in c[0]["content"] else float(c[0]["content"].count("7")) for c in completions]

    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), reward=sometimes_none, max_steps=2)
    update = parameter_update(trainer)
    assert all(torch.isfinite(value).all() for value in update.values())
    assert max_magnitude(update) > 0


def test_equal_rewards_and_unmoved_policy_give_no_update(tiny_model_dir, tmp_path):
    # Target 0 for every row and S = 0 at the reference: zero value gradient; advantages are 0 too. (Not exactly 0: the
    # reference log-probs come from the chunked head and the policy's from TRL's fused head, ~1e-9 apart.)
    trainer = build_trainer(
        "vimpo", tiny_model_dir, str(tmp_path), reward=lambda completions, **kw: [1.0] * len(completions)
    )
    assert max_magnitude(parameter_update(trainer)) < 1e-7


def test_evaluation_logs_finite_loss(tiny_model_dir, tmp_path):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), per_device_eval_batch_size=8)
    trainer.eval_dataset = trainer.train_dataset.select(range(2))
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert math.isfinite(metrics["eval_vimpo/value_loss"])


CONFIG = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(beta=0.04), "beta"),
        (dict(vimpo_beta=0.0), "vimpo_beta"),
        (dict(vimpo_beta=-1e-3), "vimpo_beta"),
        (dict(vimpo_actor_coef=-0.1), "vimpo_actor_coef"),
        (dict(vimpo_gae_lambda=1.5), "vimpo_gae_lambda"),
        (dict(vimpo_gae_lambda=-0.1), "vimpo_gae_lambda"),
        (dict(vimpo_kl_estimator="k1"), "vimpo_kl_estimator"),
        (dict(vimpo_kl_estimator="kl"), "vimpo_kl_estimator"),
        (dict(vimpo_kl_chunk_size=0), "vimpo_kl_chunk_size"),
        (dict(vimpo_dual_clip=1.0), "vimpo_dual_clip"),
        (dict(num_generations=1, per_device_train_batch_size=1), "num_generations"),
        (dict(sync_ref_model=True), "sync_ref_model"),
        (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
        (dict(entropy_coef=0.01), "entropy_coef"),
        (dict(use_vllm=True, vllm_importance_sampling_mode="token_mask"), "vllm_importance_sampling_mode"),
    ],
)
def test_bad_configuration_is_refused_with_field_and_fix(overrides, field):
    with pytest.raises(ValueError) as error:
        VIMPOConfig(**CONFIG, **overrides)
    message = str(error.value)
    assert message.startswith(f"{field}=")
    assert len(message) > len(field) + 30  # says why and what to do


def test_k1_refusal_explains_why():
    with pytest.raises(ValueError, match="identically zero"):
        VIMPOConfig(**CONFIG, vimpo_kl_estimator="k1")


def test_grpo_config_is_refused(tiny_model_dir):
    with pytest.raises(TypeError, match="VIMPOConfig"):
        VIMPOTrainer(model=tiny_model_dir, reward_funcs=lambda **kw: [], args=GRPOConfig(**CONFIG))


def test_defaults_follow_the_official_implementation():
    config = VIMPOConfig(**CONFIG)
    assert (config.vimpo_beta, config.vimpo_actor_coef, config.vimpo_gae_lambda) == (5e-4, 5e-3, 1.0)
    assert (config.vimpo_kl_estimator, config.num_generations, config.beta) == ("exact", 8, 0.0)
    assert (config.epsilon, config.epsilon_high, config.vimpo_dual_clip) == (0.2, 0.28, 10.0)


@pytest.mark.parametrize("cast_lm_head_to_fp32", [False, True])
@pytest.mark.parametrize("estimator", ["exact", "k3"])
def test_bf16_scoring_matches_trls_fused_head(estimator, cast_lm_head_to_fp32, tiny_model_dir, tmp_path):
    """In bf16 the scoring heads round the logits exactly where TRL's fused head does (bf16 tiles, or float32 with
    cast_lm_head_to_fp32), so the old log-probs VIMPO hands to TRL and the reference log-probs it sets beside TRL's
    loss-time log-probs agree with TRL's to float32 rounding (a float32 head against bf16 tiles differs by ~3e-3)."""
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        num_iterations=2,
        vimpo_kl_estimator=estimator,
        model_init_kwargs={"dtype": "bfloat16"},
        cast_lm_head_to_fp32=cast_lm_head_to_fp32,
    )
    assert trainer.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    batch = _moved_policy_batch(trainer)
    mask = loss_mask(batch)
    ids, attention, C = _sequences(batch)
    with torch.no_grad():
        trl_old, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, attention, C)
        trl_ref, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.ref_model, ids, attention, C)
    torch.testing.assert_close(batch["old_per_token_logps"] * mask, trl_old.float() * mask, rtol=0, atol=1e-4)
    torch.testing.assert_close(batch["vimpo_ref_logps"], trl_ref.float() * mask, rtol=0, atol=1e-4)
