"""VIMPOTrainer: layout (in)dependence (docs/algorithms.md#layout-independence), the one loss-time scoring path on TRL's kernels against
float64 full-softmax references, other model families, the reference model, MoE, torch.compile, end-to-end training,
refusals and metrics."""

import json
import math

import pytest
import torch
from conftest import (
    assert_refused_with_field_and_fix,
    assert_same_update,
    max_difference,
    max_magnitude,
    run_two_processes,
)
from trainer_harness import (
    build_trainer,
    full_softmax_log_probs,
    moved_policy_batch,
    parameter_update,
    record_scored_batches,
    save_tiny_family_model,
    truncate_completions,
    use_fake_vllm,
)
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from gnivo_trl import VIMPOConfig, VIMPOTrainer
from gnivo_trl.group_bookkeeping import loss_mask

# Two optimizer steps over 2 groups of K=4 (8 rows). At step 1 the policy equals the reference, so rho - kappa = 0 and
# only the value loss acts; step 2 exercises the KL, the advantages, their whitening and the actor loss.
SINGLE_PROCESS_LAYOUTS = {
    "accumulation, whole groups": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
    "accumulation, split groups": dict(per_device_train_batch_size=2, gradient_accumulation_steps=4),
    "several generations per step": dict(
        per_device_train_batch_size=2, gradient_accumulation_steps=4, steps_per_generation=2
    ),
}


@pytest.fixture(scope="module")
def reference_update(tiny_model_dir, tmp_path_factory):
    """The update of TRL's default layout: one micro-batch holds the whole generation batch, one process."""
    cache = {}

    def get(**extra):
        extra.setdefault("num_generations", 4)
        key = tuple(sorted(extra.items()))
        if key not in cache:
            settings = dict(per_device_train_batch_size=8)
            settings.update(extra)
            trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path_factory.mktemp("ref")), **settings)
            cache[key] = parameter_update(trainer)
        return cache[key]

    return get


@pytest.mark.parametrize("layout", list(SINGLE_PROCESS_LAYOUTS))
def test_value_only_update_does_not_depend_on_layout(layout, tiny_model_dir, tmp_path, reference_update):
    extra = dict(max_steps=2, vimpo_actor_coeff=0.0)
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), **SINGLE_PROCESS_LAYOUTS[layout], **extra)
    assert_same_update(parameter_update(trainer), reference_update(**extra))


@pytest.mark.parametrize("layout", list(SINGLE_PROCESS_LAYOUTS))
def test_actor_whitens_each_micro_batch(layout, tiny_model_dir, tmp_path, reference_update):
    """Documented behaviour (docs/algorithms.md#vimpo-whitening, as the official code): with several micro-batches per generation batch
    each whitens its own advantages, so the actor term, and only it, depends on the layout."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), **SINGLE_PROCESS_LAYOUTS[layout], max_steps=2)
    batches = record_scored_batches(trainer)
    update = parameter_update(trainer)
    assert max_difference(update, reference_update(max_steps=2)) > 1e-4
    advantages, mask = batches[-1]["vimpo_advantages"], loss_mask(batches[-1]).bool()
    # The last micro-batch's advantages are whitened over that micro-batch alone: mean 0, variance 1.
    assert abs(float(advantages[mask].mean())) < 1e-5
    assert abs(float(advantages[mask].var()) - 1.0) < 1e-3


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("layout", "max_steps"),
    [
        (dict(per_device_train_batch_size=4), 2),  # one whole group per process
        # One group of K=8 whose rows straddle the two processes: targets, whitening and the token mean are global.
        (dict(per_device_train_batch_size=4, num_generations=8), 2),
        # Long completions on rank 0, one-token ones on rank 1, and a tiny KL chunk: every rank must still issue the
        # same collectives.
        (dict(per_device_train_batch_size=4, long_then_short=True, vimpo_kl_chunk_size=8), 1),
    ],
    ids=["whole-groups", "straddling-processes", "unequal-lengths"],
)
def test_two_processes_match_one_process_in_the_default_layout(
    layout, max_steps, tiny_model_dir, tmp_path, reference_update
):
    saved = run_two_processes("vimpo", tiny_model_dir, tmp_path, json.dumps(dict(layout, max_steps=max_steps)))
    single = {key: value for key, value in layout.items() if key != "per_device_train_batch_size"}
    assert_same_update(saved["update"], reference_update(max_steps=max_steps, **single))
    assert math.isfinite(saved["metrics"]["vimpo/value_loss"])


@pytest.mark.distributed
def test_two_processes_value_loss_with_accumulation(tiny_model_dir, tmp_path, reference_update):
    layout = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, vimpo_actor_coeff=0.0, max_steps=2)
    saved = run_two_processes("vimpo", tiny_model_dir, tmp_path, json.dumps(layout))
    assert_same_update(saved["update"], reference_update(max_steps=2, vimpo_actor_coeff=0.0))


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


def test_reference_of_a_model_instance_is_a_copy_of_it(tiny_model_dir, tmp_path):
    """A policy changed in memory gets itself as reference (not the checkpoint it was loaded from): KL 0 at step 1."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), model=model)
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), trainer.ref_model.named_parameters()):
        assert torch.equal(p, q), name
    trainer.train()
    first = [entry for entry in trainer.state.log_history if "vimpo/kl" in entry][0]
    assert first["vimpo/kl"] == 0.0 and first["vimpo/advantage_std"] == 0.0


def _sequences(batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return ids, attention, batch["completion_ids"].size(1)


def _expected_scores(trainer, batch, temperature: float) -> dict[str, torch.Tensor]:
    mask = batch["completion_mask"].double()
    index = batch["completion_ids"][..., None]
    policy = full_softmax_log_probs(trainer.model, batch, temperature)
    ref = full_softmax_log_probs(trainer.ref_model, batch, temperature)
    return {
        "logp": policy.gather(-1, index).squeeze(-1) * mask,
        "ref_logp": ref.gather(-1, index).squeeze(-1) * mask,
        "exact_kl": (policy.exp() * (policy - ref)).sum(-1) * mask,
        "entropy": -(policy.exp() * policy).sum(-1) * mask,
    }


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_token_scores_equal_a_full_softmax(temperature, chunk_size, tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "vimpo", tiny_model_dir, str(tmp_path), temperature=temperature, vimpo_kl_chunk_size=chunk_size
    )
    batch = moved_policy_batch(trainer)
    scores = trainer._token_scores(trainer.model, batch)
    assert batch["completion_mask"].sum() > 0 and (batch["completion_mask"] == 0).any()  # ragged rows
    expected = _expected_scores(trainer, batch, temperature)
    assert expected["exact_kl"].max() > 1e-3
    torch.testing.assert_close(scores.token_kl.double(), expected["exact_kl"], rtol=1e-4, atol=1e-6)
    for name in ("logp", "ref_logp", "entropy"):
        torch.testing.assert_close(getattr(scores, name).double(), expected[name], rtol=1e-5, atol=1e-5)
    assert scores.logp.requires_grad and not scores.ref_logp.requires_grad and not scores.token_kl.requires_grad


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_sampled_kl_estimators_use_both_models_sampled_log_probs(estimator, tiny_model_dir, tmp_path):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), temperature=0.7, vimpo_kl_estimator=estimator)
    batch = moved_policy_batch(trainer)
    scores = trainer._token_scores(trainer.model, batch)
    expected = _expected_scores(trainer, batch, 0.7)
    log_ratio = expected["logp"] - expected["ref_logp"]
    kl = 0.5 * log_ratio.square() if estimator == "k2" else torch.expm1(-log_ratio) + log_ratio
    assert kl.max() > 1e-3
    torch.testing.assert_close(scores.token_kl.double(), kl, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["granite", "gemma2", "cohere"])
def test_other_model_families_are_scored_as_their_own_forward(family, tmp_path):
    """Granite divides its logits by logits_scaling, Gemma 2 soft-caps them, Cohere multiplies them by logit_scale:
    the scores (and the KL) equal a float64 computation from the model's own forward().logits."""
    model_dir = save_tiny_family_model(tmp_path / family, family)
    trainer = build_trainer("vimpo", model_dir, str(tmp_path / "run"), temperature=0.7)
    batch = moved_policy_batch(trainer, scale=0.05)
    scores = trainer._token_scores(trainer.model, batch)
    expected = _expected_scores(trainer, batch, 0.7)
    assert expected["exact_kl"].max() > 1e-3
    torch.testing.assert_close(scores.token_kl.double(), expected["exact_kl"], rtol=1e-4, atol=1e-5)
    for name in ("logp", "ref_logp"):
        torch.testing.assert_close(getattr(scores, name).double(), expected[name], rtol=1e-5, atol=1e-5)


def test_each_model_runs_one_forward_per_loss_step(tiny_model_dir, tmp_path):
    """Nothing is scored at generation time (without old log-probs TRL runs no forward there); the loss step runs
    one backbone forward of each model, as GRPO with beta > 0 does over a step."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path))
    rows = {"policy": 0, "reference": 0}

    def counter(name):
        def hook(module, args, kwargs, output):
            rows[name] += kwargs["input_ids"].size(0)

        return hook

    trainer.model.model.register_forward_hook(counter("policy"), with_kwargs=True)
    trainer.ref_model.model.register_forward_hook(counter("reference"), with_kwargs=True)
    batch = moved_policy_batch(trainer)
    assert rows == {"policy": 0, "reference": 0}
    trainer._compute_loss(trainer.model, batch)
    num_rows = batch["completion_ids"].size(0)
    assert rows == {"policy": num_rows, "reference": num_rows}


def test_unmoved_policy_has_exactly_zero_kl_and_advantages(tiny_model_dir, tmp_path):
    """While the policy is the reference, rho - kappa is exactly 0 (not rounding noise that whitening would blow up
    to unit scale): both models are scored by the same kernels on the same hidden states."""
    for estimator in ("exact", "k3"):
        trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), vimpo_kl_estimator=estimator)
        batches = record_scored_batches(trainer)
        trainer.train()
        assert loss_mask(batches[0]).sum() > 0
        assert torch.equal(batches[0]["vimpo_ref_logps"], trainer._token_scores(trainer.model, batches[0]).ref_logp)
        assert batches[0]["vimpo_token_kl"].abs().max() == 0, estimator
        assert batches[0]["vimpo_advantages"].abs().max() == 0, estimator


def test_value_targets_are_group_centred_raw_rewards(tiny_model_dir, tmp_path):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path))
    batch = trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(2)).repeat(4)))
    rewards = batch["row_rewards"].reshape(-1, 4)
    expected = (rewards - rewards.mean(dim=1, keepdim=True)).reshape(-1)  # no std scaling
    torch.testing.assert_close(batch["vimpo_value_target"], expected)
    assert rewards.std(dim=1).max() > 0
    assert "vimpo_advantages" not in batch and "vimpo_token_kl" not in batch  # nothing else at generation time


def test_rows_masked_by_importance_sampling_leave_their_group(tiny_model_dir, tmp_path):
    """vLLM's "sequence_mask" gives a row ratio 0: like a row without reward (and as in GN-IVO), it is out of the
    group mean, both losses and the whitening statistics."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), max_steps=2)
    use_fake_vllm(trainer, "sequence_mask", [0.0, 0.0, 0.0, -1.5])  # the fourth member's ratio 4.5 > 3 is masked
    batches = record_scored_batches(trainer)
    trainer.train()
    for batch in batches:
        masked = batch["importance_sampling_ratio"].reshape(-1) == 0
        assert int(masked.sum()) == 2
        assert torch.isnan(batch["vimpo_value_target"][masked]).all()
        assert torch.all(batch["vimpo_advantages"][masked] == 0)
        kept = ~masked & ~torch.isnan(batch["row_rewards"])
        groups = batch["row_group_index"]
        for group in groups.unique():
            members = kept & (groups == group)
            expected = batch["row_rewards"][members] - batch["row_rewards"][members].mean()
            torch.testing.assert_close(batch["vimpo_value_target"][members], expected)
    # The whitening statistics cover the kept rows only: mean 0, variance 1 over their tokens.
    last = batches[-1]
    mask = loss_mask(last).bool() & ~(last["importance_sampling_ratio"].reshape(-1, 1) == 0)
    assert abs(float(last["vimpo_advantages"][mask].mean())) < 1e-5
    assert abs(float(last["vimpo_advantages"][mask].var()) - 1.0) < 1e-3


def test_importance_ratio_weights_the_actor_only(tiny_model_dir, tmp_path):
    """vLLM's sequence-level importance ratio (here "sequence_truncate": ratios between 0.22 and 2.2) weights the
    actor's tokens and leaves the value loss alone, as the official code does: the value-only loss of a micro-batch
    is the same float with the ratio or without it, while the actor term changes."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), vimpo_actor_coeff=0.0)
    use_fake_vllm(trainer, "sequence_truncate", [0.3, -0.8, 1.5, 0.5])
    batch = moved_policy_batch(trainer)
    ratio = batch["importance_sampling_ratio"]
    assert (ratio.reshape(-1) - 1).abs().min() > 0.1  # every row's ratio is far from 1
    without_ratio = {name: value for name, value in batch.items() if name != "importance_sampling_ratio"}
    with torch.no_grad():
        value_only = trainer._compute_loss(trainer.model, batch)
        assert torch.equal(value_only, trainer._compute_loss(trainer.model, without_ratio))
        trainer.args.vimpo_actor_coeff = 1.0
        with_actor = trainer._compute_loss(trainer.model, batch) - value_only
        assert abs(float(with_actor - (trainer._compute_loss(trainer.model, without_ratio) - value_only))) > 1e-4


@pytest.mark.slow
def test_mixture_of_experts_loss_includes_the_router_loss_as_grpo(tmp_path):
    """The MoE load-balancing loss enters exactly as in GRPO: router_aux_loss_coef * aux / accumulation, with aux the
    value TRL's fused head computes for the policy."""
    model_dir = save_tiny_family_model(tmp_path / "mixtral", "mixtral")
    trainer = build_trainer("vimpo", model_dir, str(tmp_path / "run"), gradient_accumulation_steps=2)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.05
    batch = moved_policy_batch(trainer, scale=0.05)
    with torch.no_grad():
        with_aux = trainer._compute_loss(trainer.model, batch)
        trainer.router_aux_loss_coef = 0.0
        without = trainer._compute_loss(trainer.model, batch)
        ids, attention, C = _sequences(batch)
        _, _, aux = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, attention, C, compute_aux_loss=True
        )
    assert aux > 0
    torch.testing.assert_close(with_aux - without, 0.05 * aux / 2, rtol=1e-5, atol=1e-7)
    assert trainer._metrics["train"]["aux_loss"]


@pytest.mark.slow
def test_compiled_model_trains_as_the_eager_one(tiny_model_dir, tmp_path, reference_update):
    """torch_compile=True (dynamo's eager backend: the graph capture, where module hooks added later would be
    skipped, without inductor's compile time): the scores come from the forward itself, so the update is the same."""
    trainer = build_trainer(
        "vimpo", tiny_model_dir, str(tmp_path), max_steps=2, torch_compile=True, torch_compile_backend="eager"
    )
    update = parameter_update(trainer)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert_same_update(update, reference_update(max_steps=2))


@pytest.mark.slow
@pytest.mark.parametrize("actor_coef", [0.0, 5e-3])
@pytest.mark.parametrize("estimator", ["exact", "k2", "k3"])
def test_trains_end_to_end(estimator, actor_coef, tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        vimpo_kl_estimator=estimator,
        vimpo_actor_coeff=actor_coef,
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
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert 0.0 <= entry[name] <= 1.0, (name, entry)


def test_clip_ratios_are_logged_like_grpo(tiny_model_dir, tmp_path):
    """With old log-probs (num_iterations=2) the second pass over a batch clips some tokens; the logged fractions are
    the masked token means of GRPO's definitions."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), max_steps=2, num_iterations=2, learning_rate=5.0)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "clip_ratio/region_mean" in entry]
    assert len(logged) == 2
    assert logged[1]["clip_ratio/region_mean"] > 0
    assert logged[1]["clip_ratio/region_mean"] == pytest.approx(
        logged[1]["clip_ratio/low_mean"] + logged[1]["clip_ratio/high_mean"]
    )


def test_actor_coefficient_changes_the_update(tiny_model_dir, tmp_path, reference_update):
    # Value-only (c_A = 0) and the default mix differ once the advantages are non-zero (step 2).
    value_only = build_trainer("vimpo", tiny_model_dir, str(tmp_path), max_steps=2, vimpo_actor_coeff=0.0)
    assert max_difference(parameter_update(value_only), reference_update(max_steps=2)) > 1e-4


def test_lambda_reaches_the_update(tiny_model_dir, tmp_path, reference_update):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), max_steps=2, vimpo_gae_lambda=0.95)
    assert max_difference(parameter_update(trainer), reference_update(max_steps=2)) > 1e-6


@pytest.mark.slow
def test_trains_with_real_generation(tiny_model_dir, tmp_path):
    """The unstubbed path: the tiny model samples its own completions."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), max_steps=2, learning_rate=0.05)
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
    # Target 0 for every row and S = 0 at the reference (exactly: same kernels, same hidden states): no gradient.
    trainer = build_trainer(
        "vimpo", tiny_model_dir, str(tmp_path), reward=lambda completions, **kw: [1.0] * len(completions)
    )
    assert max_magnitude(parameter_update(trainer)) == 0.0


def test_evaluation_logs_finite_loss(tiny_model_dir, tmp_path):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), per_device_eval_batch_size=8)
    trainer.eval_dataset = trainer.train_dataset.select(range(2))
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert math.isfinite(metrics["eval_vimpo/value_loss"])


@pytest.mark.parametrize("cast_lm_head_to_fp32", [False, True])
def test_bf16_scores_match_trls_fused_head(cast_lm_head_to_fp32, tiny_model_dir, tmp_path):
    """In bf16 both models' log-probs round exactly where TRL's fused head rounds them (bf16 tiles, or a float32 head
    with cast_lm_head_to_fp32): they agree with GRPO's own forward to float32 rounding."""
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        model_init_kwargs={"dtype": "bfloat16"},
        cast_lm_head_to_fp32=cast_lm_head_to_fp32,
    )
    assert trainer.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    batch = moved_policy_batch(trainer)
    mask = loss_mask(batch)
    scores = trainer._token_scores(trainer.model, batch)
    ids, attention, C = _sequences(batch)
    with torch.no_grad():
        trl_policy, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, attention, C)
        trl_ref, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.ref_model, ids, attention, C)
    torch.testing.assert_close(scores.logp.detach(), trl_policy.float() * mask, rtol=0, atol=1e-4)
    torch.testing.assert_close(scores.ref_logp, trl_ref.float() * mask, rtol=0, atol=1e-4)


CONFIG = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(beta=0.04), "beta"),
        (dict(vimpo_beta=0.0), "vimpo_beta"),
        (dict(vimpo_beta=-1e-3), "vimpo_beta"),
        (dict(vimpo_actor_coeff=-0.1), "vimpo_actor_coeff"),
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
        # GRPO loss options VIMPO would otherwise ignore silently.
        (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(delta=2.0), "delta"),
        (dict(loss_type="grpo"), "loss_type"),
        (dict(loss_type="dr_grpo"), "loss_type"),
        (dict(use_bias_correction_kl=True), "use_bias_correction_kl"),
        (dict(fsdp="full_shard"), "fsdp"),
        # Liger's kernels would run in the policy only, so rho and the KL would not start at 0.
        (dict(use_liger_kernel=True), "use_liger_kernel"),
    ],
)
def test_bad_configuration_is_refused_with_field_and_fix(overrides, field):
    assert_refused_with_field_and_fix(VIMPOConfig, field, **CONFIG, **overrides)


def test_fsdp_from_an_accelerate_launch_is_refused(monkeypatch):
    """``accelerate launch`` with an FSDP config sets ACCELERATE_USE_FSDP; VIMPO refuses it and names ZeRO-3."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"^fsdp=.*zero3\.yaml"):
        VIMPOConfig(**CONFIG)


def test_vision_language_models_are_refused(tiny_model_dir, tmp_path, monkeypatch):
    """VIMPO's scoring runs the backbones directly and is not tested with image inputs: a VLM (GRPOTrainer's
    ``_is_vlm``, set for a multimodal processor) is refused with the fix, instead of scoring without the images."""
    original = GRPOTrainer.__init__

    def init_as_vlm(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._is_vlm = True  # what GRPOTrainer sets for a ProcessorMixin processing_class

    monkeypatch.setattr(GRPOTrainer, "__init__", init_as_vlm)
    with pytest.raises(ValueError, match="does not support vision-language models"):
        build_trainer("vimpo", tiny_model_dir, str(tmp_path))


def test_k1_refusal_explains_why():
    with pytest.raises(ValueError, match="identically zero"):
        VIMPOConfig(**CONFIG, vimpo_kl_estimator="k1")


def test_grpo_config_is_refused(tiny_model_dir):
    with pytest.raises(TypeError, match="VIMPOConfig"):
        VIMPOTrainer(model=tiny_model_dir, reward_funcs=lambda **kw: [], args=GRPOConfig(**CONFIG))


def test_defaults_follow_the_official_implementation():
    config = VIMPOConfig(**CONFIG)
    assert (config.vimpo_beta, config.vimpo_actor_coeff, config.vimpo_gae_lambda) == (5e-4, 5e-3, 1.0)
    assert (config.vimpo_kl_estimator, config.num_generations, config.beta) == ("exact", 8, 0.0)
    assert (config.epsilon, config.epsilon_high, config.vimpo_dual_clip) == (0.2, 0.28, 10.0)
    assert (config.loss_type, config.use_bias_correction_kl) == ("dapo", False)


# ----------------------------------------------------------------------------------------------------------------------
# Truncated completions masked out (mask_truncated_completions=True; docs/algorithms.md#masked-rows)
# ----------------------------------------------------------------------------------------------------------------------


def test_every_completion_truncated_and_masked_gives_a_zero_loss_as_grpo(tiny_model_dir, tmp_path):
    """A fully masked row keeps its reward (and its group's mean) but has nothing to regress: with every completion
    masked the logged loss and vimpo/value_loss are 0, as GRPO's loss is, and nothing moves."""
    logged = {}
    for algorithm in ("grpo", "vimpo"):
        trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path / algorithm), mask_truncated_completions=True)
        truncate_completions(trainer)
        batches = record_scored_batches(trainer)
        update = parameter_update(trainer)
        assert loss_mask(batches[0]).sum() == 0 and max_magnitude(update) == 0.0
        logged[algorithm] = trainer.state.log_history[0]
    assert logged["grpo"]["loss"] == 0.0
    assert logged["vimpo"]["loss"] == 0.0 and logged["vimpo"]["vimpo/value_loss"] == 0.0


def test_masked_rows_stay_in_their_group_mean_but_out_of_the_value_loss(tiny_model_dir, tmp_path):
    """Some completions truncated (no EOS) and masked: the value targets are still centred on the group mean over
    all rows, and the loss equals that of the unmasked rows alone (value loss: their mean; actor: their tokens and
    whitening), independently of the masked rows' rewards."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), mask_truncated_completions=True)
    truncate_completions(trainer, rows=lambda index: index % 4 in (0, 3) and index < 4)  # two rows of the first group
    batch = moved_policy_batch(trainer, seed=0)
    masked = loss_mask(batch).sum(dim=1) == 0
    assert int(masked.sum()) == 2
    rewards = batch["row_rewards"].reshape(-1, 4)
    torch.testing.assert_close(batch["vimpo_value_target"], (rewards - rewards.mean(dim=1, keepdim=True)).reshape(-1))
    kept = torch.nonzero(~masked).flatten()
    assert not torch.allclose(
        batch["vimpo_value_target"][kept], batch["row_rewards"][kept] - _kept_group_means(batch, masked)[kept]
    )  # the masked rows' rewards do move the targets
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch)
        value_loss = trainer._metrics["train"]["vimpo/value_loss"][-1]
        # The unmasked rows alone, with the targets of the whole groups and their own row count.
        only_kept = {
            key: value[kept] if isinstance(value, torch.Tensor) and value.ndim > 0 else value
            for key, value in batch.items()
        }
        only_kept["vimpo_value_rows"] = torch.tensor(len(kept))
        torch.testing.assert_close(loss, trainer._compute_loss(trainer.model, only_kept), rtol=1e-5, atol=1e-7)
        expected = _expected_scores(trainer, batch, 1.0)
        beta = trainer.args.vimpo_beta
        value = beta * (expected["logp"] - expected["ref_logp"] - expected["exact_kl"]).sum(dim=1)
        residuals = value - batch["vimpo_value_target"].double()
        assert value_loss == pytest.approx(float(0.5 * residuals[kept].square().mean()), rel=1e-4)


def _kept_group_means(batch, masked) -> torch.Tensor:
    """Each row's group mean reward over the group's unmasked rows only (what the targets must NOT use)."""
    rewards, groups = batch["row_rewards"], batch["row_group_index"]
    means = torch.empty_like(rewards)
    for group in groups.unique():
        members = groups == group
        means[members] = rewards[members & ~masked].mean() if bool((members & ~masked).any()) else 0.0
    return means
