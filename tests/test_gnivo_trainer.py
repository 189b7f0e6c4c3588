"""GNIVOTrainer: layout-independent gradients (docs/algorithms.md#layout-independence), end-to-end training, refusals, metrics, model card."""

import json
import math

import pytest
import torch
from conftest import assert_refused_with_field_and_fix, assert_same_update, max_magnitude, run_two_processes
from trainer_harness import (
    COMPLETION_POOL,
    build_trainer,
    parameter_update,
    save_tiny_family_model,
    truncate_completions,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from gnivo_trl import GNIVOConfig, GNIVOTrainer

# One optimizer step over 2 groups of K=4 (8 rows), laid out in different ways.
SINGLE_PROCESS_LAYOUTS = {
    "one micro-batch": dict(per_device_train_batch_size=8),
    "accumulation, whole groups": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
    "accumulation, split groups": dict(per_device_train_batch_size=2, gradient_accumulation_steps=4),
    "generation per micro-step, split groups": dict(
        per_device_train_batch_size=2, gradient_accumulation_steps=4, steps_per_generation=2
    ),
}


@pytest.fixture(scope="module")
def reference_update(tiny_model_dir, tmp_path_factory):
    cache = {}

    def get(unit: str, **extra):
        key = (unit, tuple(sorted(extra.items())))
        if key not in cache:
            trainer = build_trainer(
                "gnivo",
                tiny_model_dir,
                str(tmp_path_factory.mktemp("ref")),
                gnivo_prefix_unit=unit,
                gnivo_step_delimiter="\n\n",
                per_device_train_batch_size=8,
                **extra,
            )
            cache[key] = parameter_update(trainer)
        return cache[key]

    return get


@pytest.mark.parametrize("unit", ["token", "step", "sequence"])
@pytest.mark.parametrize("layout", list(SINGLE_PROCESS_LAYOUTS))
def test_one_step_update_does_not_depend_on_layout(layout, unit, tiny_model_dir, tmp_path, reference_update):
    trainer = build_trainer(
        "gnivo",
        tiny_model_dir,
        str(tmp_path),
        gnivo_prefix_unit=unit,
        gnivo_step_delimiter="\n\n",
        **SINGLE_PROCESS_LAYOUTS[layout],
    )
    expected_whole = trainer.args.per_device_train_batch_size % 4 == 0
    assert trainer._keeps_groups_whole == expected_whole  # both loss paths are exercised
    assert_same_update(parameter_update(trainer), reference_update(unit))


@pytest.mark.parametrize("normalization", ["softmax", "none"])
def test_update_with_kl_penalty_and_weight_forms_does_not_depend_on_layout(
    normalization, tiny_model_dir, tmp_path, reference_update
):
    # Step 2 runs with policy != reference; a moderate step size keeps that policy away from collapse (kl = inf).
    extra = dict(beta=0.04, max_steps=2, learning_rate=0.02, gnivo_weight_normalization=normalization)
    reference = reference_update("token", **extra)
    trainer = build_trainer(
        "gnivo", tiny_model_dir, str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4, **extra
    )
    assert_same_update(parameter_update(trainer), reference)
    assert any("kl" in entry for entry in trainer.state.log_history)


def test_policy_moving_within_generation_batch_matches_one_micro_batch(tiny_model_dir, tmp_path, reference_update):
    # num_iterations=2: the second optimizer step reuses the batch with a moved policy, so the group softmax is no
    # longer uniform and whole groups are required.
    reference = reference_update("step", num_iterations=2, max_steps=2)
    trainer = build_trainer(
        "gnivo",
        tiny_model_dir,
        str(tmp_path),
        gnivo_prefix_unit="step",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_iterations=2,
        max_steps=2,
    )
    assert_same_update(parameter_update(trainer), reference)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        dict(per_device_train_batch_size=4),  # one whole group per process
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=2),  # groups split over micro-batches
        # Each generation batch is one group whose rows straddle the two processes.
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, steps_per_generation=1),
    ],
    ids=["whole-groups", "split-micro-batches", "straddling-processes"],
)
def test_two_processes_match_one_process(layout, tiny_model_dir, tmp_path, reference_update):
    saved = run_two_processes("gnivo", tiny_model_dir, tmp_path, json.dumps(dict(layout, gnivo_prefix_unit="step")))
    assert_same_update(saved["update"], reference_update("step"))
    # Metrics are reduced over processes: the logged loss is the global one, as in a single process.
    assert math.isfinite(saved["metrics"]["gnivo/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("unit", ["token", "step"])
def test_trains_end_to_end(unit, num_iterations, tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "gnivo",
        tiny_model_dir,
        str(tmp_path),
        gnivo_prefix_unit=unit,
        num_iterations=num_iterations,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=0.05,
    )
    update = parameter_update(trainer)
    assert all(value.abs().max() > 0 for value in update.values()), "every parameter tensor changes"
    logs = [entry for entry in trainer.state.log_history if "gnivo/loss" in entry]
    assert len(logs) >= 4
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["gnivo/loss"]) for entry in logs)
    generation_logs = [entry for entry in trainer.state.log_history if "gnivo/prefix_horizon" in entry]
    assert all(0.0 <= entry["gnivo/weight_entropy"] <= math.log(4) + 1e-6 for entry in generation_logs)


@pytest.mark.slow
def test_trains_with_real_generation(tiny_model_dir, tmp_path):
    """The unstubbed path: the tiny model samples its own completions."""
    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path), max_steps=2, learning_rate=0.05)
    from trl import GRPOTrainer

    trainer._generate_single_turn = GRPOTrainer._generate_single_turn.__get__(trainer)
    update = parameter_update(trainer)
    assert all(value.abs().max() > 0 for value in update.values())


def test_step_units_count_delimited_steps(tiny_model_dir, tmp_path):
    """The prefix horizon of a group is its largest number of '\\n\\n'-delimited steps (text ends count as one)."""
    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path), gnivo_prefix_unit="step", max_steps=1)
    captured = {}
    original = trainer._add_group_statistics

    def capture(output, *args):
        original(output, *args)
        captured.update(output)

    trainer._add_group_statistics = capture
    parameter_update(trainer)
    tokenizer = trainer.processing_class
    for row in range(captured["completion_ids"].size(0)):
        mask = captured["completion_mask"][row].bool()
        text = tokenizer.decode(captured["completion_ids"][row][mask], skip_special_tokens=True)
        assert text in COMPLETION_POOL or any(text == t[: len(text)] for t in COMPLETION_POOL)
        expected_ends = text.count("\n\n")
        assert int(captured["gnivo_unit_ends"][row].sum()) == expected_ends


def test_rows_without_reward_leave_their_group(tiny_model_dir, tmp_path):
    def sometimes_none(completions, **kwargs):
        return [None if "Hi" in c[0]["content"] else float(c[0]["content"].count("7")) for c in completions]

    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path), reward=sometimes_none, max_steps=2)
    update = parameter_update(trainer)
    assert all(torch.isfinite(value).all() for value in update.values())
    fractions = [
        entry["gnivo/member_fraction"] for entry in trainer.state.log_history if "gnivo/member_fraction" in entry
    ]
    assert fractions and all(0.0 < f <= 1.0 for f in fractions)


def test_equal_rewards_give_no_update(tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "gnivo", tiny_model_dir, str(tmp_path), reward=lambda completions, **kw: [1.0] * len(completions)
    )
    update = parameter_update(trainer)
    assert max_magnitude(update) == 0.0


@pytest.mark.slow
def test_mixture_of_experts_loss_includes_the_router_loss_as_grpo(tmp_path):
    """The MoE load-balancing loss enters exactly as in GRPO: router_aux_loss_coef * aux / accumulation, with aux
    from the same forward (TRL's fused head)."""
    model_dir = save_tiny_family_model(tmp_path / "mixtral", "mixtral")
    trainer = build_trainer("gnivo", model_dir, str(tmp_path / "run"), gradient_accumulation_steps=2)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.05
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    batch = trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(2)).repeat(4)))
    with torch.no_grad():
        with_aux = trainer._compute_loss(trainer.model, batch)
        trainer.router_aux_loss_coef = 0.0
        without = trainer._compute_loss(trainer.model, batch)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        _, _, aux = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, attention, batch["completion_ids"].size(1), compute_aux_loss=True
        )
    assert aux > 0
    torch.testing.assert_close(with_aux - without, 0.05 * aux / 2, rtol=1e-5, atol=1e-7)
    assert trainer._metrics["train"]["aux_loss"]


def test_reference_of_a_model_instance_is_a_copy_of_it(tiny_model_dir, tmp_path):
    """With beta > 0, a policy changed in memory gets itself as reference, not the checkpoint it was loaded from."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path), model=model, beta=0.04)
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), trainer.ref_model.named_parameters()):
        assert torch.equal(p, q), name
    trainer.train()
    assert [entry for entry in trainer.state.log_history if "kl" in entry][0]["kl"] == 0.0


def test_reference_of_an_instance_is_prepared_as_trl_prepares_its_own(tiny_model_dir, tmp_path):
    """A model built from a config has no path to reload a reference from; its reference is a copy, made the
    reference TRL would have made: a float32 head (cast_lm_head_to_fp32), TRL's fused head, synced by sync_ref_model,
    and a plain forward of its own (not the policy's through a copied closure)."""
    from trl.trainer.callbacks import SyncRefModelCallback

    from gnivo_trl import scoring
    from gnivo_trl.testing import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = build_tiny_model(tokenizer, seed=3)
    assert model.config._name_or_path == ""
    trainer = build_trainer(
        "gnivo",
        tiny_model_dir,
        str(tmp_path),
        model=model,
        beta=0.04,
        cast_lm_head_to_fp32=True,
        disable_dropout=True,
        sync_ref_model=True,
        ref_model_sync_steps=1,
        max_steps=2,
    )
    reference = trainer.ref_model
    assert reference is not trainer.model and trainer.beta == 0.04 and trainer.args.sync_ref_model
    assert reference.get_output_embeddings().weight.dtype == torch.float32
    assert scoring.fused_head_settings(reference).cast_lm_head_to_fp32
    syncs = [c for c in trainer.callback_handler.callbacks if isinstance(c, SyncRefModelCallback)]
    assert len(syncs) == 1 and syncs[0].ref_model is reference
    ids = tokenizer("What is 3 + 4?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, trainer.model(input_ids=ids).logits)
        for p in trainer.model.parameters():
            p.add_(0.1)
        assert (reference(input_ids=ids).logits - trainer.model(input_ids=ids).logits).abs().max() > 1e-3
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_float32_head_of_a_tied_reference_follows_the_dtype_deepspeed_gives_the_model(tiny_model_dir):
    """cast_lm_head_to_fp32 on a reference with tied embeddings: the embedding hands the layers activations in the
    dtype the model is in when it runs, not the one it had when the trainer was built. DeepSpeed under bf16 casts
    every parameter, the float32 head included, when it prepares the model (after the trainer has built the
    reference); a dtype read at construction then made the layers multiply float32 activations by bf16 weights."""
    from gnivo_trl.group_bookkeeping import cast_output_head_to_float32

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    cast_output_head_to_float32(model)
    with torch.no_grad():
        for parameter in model.parameters():  # what DeepSpeedEngine does to a model under bf16
            parameter.data = parameter.data.to(torch.bfloat16)
        ids = torch.tensor([[5, 9, 17, 3]])
        logits = model(input_ids=ids).logits
        hidden = model.model(input_ids=ids).last_hidden_state
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    expected = hidden.float() @ model.get_output_embeddings().weight.float().T  # the head projects in float32
    torch.testing.assert_close(logits, expected)


def test_parameterwise_copy_is_trls_sync_and_an_exact_copy_over_uninitialised_memory(tiny_model_dir):
    """copy_parameters_one_at_a_time (the ZeRO-3 reference copy and refresh; without ZeRO-3 it runs the same code on
    whole tensors): TRL's SyncRefModelCallback mixing for alpha < 1, an exact copy for alpha = 1 even over memory
    holding NaN (a reference built without initialisation), and a clear error for models that do not match."""
    from trl.trainer.callbacks import SyncRefModelCallback

    from gnivo_trl.group_bookkeeping import copy_parameters_one_at_a_time

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    policy, target, expected = load(), load(), load()
    with torch.no_grad():
        for p, q in zip(policy.parameters(), target.parameters()):
            p.add_(0.1 * torch.randn_like(p))
            q.add_(0.1 * torch.randn_like(q))
        for q, e in zip(target.parameters(), expected.parameters()):
            e.copy_(q)
    SyncRefModelCallback._sync_target_model(policy, expected, 0.3)
    copy_parameters_one_at_a_time(policy, target, alpha=0.3)
    for (name, q), e in zip(target.named_parameters(), expected.parameters()):
        torch.testing.assert_close(q, e, rtol=0, atol=1e-7, msg=name)
    with torch.no_grad():
        for q in target.parameters():
            q.fill_(float("nan"))
    copy_parameters_one_at_a_time(policy, target)
    for (name, p), q in zip(policy.named_parameters(), target.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="their parameters differ"):
        copy_parameters_one_at_a_time(policy, policy.model)


def test_evaluation_logs_finite_loss(tiny_model_dir, tmp_path):
    trainer = build_trainer(
        "gnivo", tiny_model_dir, str(tmp_path), per_device_eval_batch_size=8, eval_strategy="no", do_eval=False
    )
    trainer.eval_dataset = trainer.train_dataset.select(range(2))
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert math.isfinite(metrics["eval_gnivo/loss"])


def test_model_card_names_algorithm_and_paper(tiny_model_dir, tmp_path):
    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path))
    trainer.create_model_card(dataset_name="tiny-arithmetic")
    card = (tmp_path / "README.md").read_text()
    assert "gnivo" in card and "GN-IVO" in card
    assert "Group-Normalized Implicit Value Optimization for Language Models" in card
    assert "tiny-arithmetic" in card


CONFIG = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(gnivo_alpha=0.0), "gnivo_alpha"),
        (dict(gnivo_alpha=-1.0), "gnivo_alpha"),
        (dict(num_generations=1, per_device_train_batch_size=1), "num_generations"),
        (dict(gnivo_prefix_unit="paragraph"), "gnivo_prefix_unit"),
        (dict(gnivo_prefix_unit="step", gnivo_step_delimiter=""), "gnivo_step_delimiter"),
        (dict(gnivo_weight_normalization="l1"), "gnivo_weight_normalization"),
        (
            dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_iterations=2),
            "per_device_train_batch_size",
        ),
        (
            dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, steps_per_generation=2),
            "per_device_train_batch_size",
        ),
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
        (dict(entropy_coef=0.01), "entropy_coef"),
        (dict(multi_objective_aggregation="normalize_then_sum"), "multi_objective_aggregation"),
    ],
)
def test_bad_configuration_is_refused_with_field_and_fix(overrides, field):
    assert_refused_with_field_and_fix(GNIVOConfig, field, **CONFIG, **overrides)


def test_token_level_vllm_importance_sampling_is_refused():
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode='token_truncate'.*sequence"):
        GNIVOConfig(**CONFIG, use_vllm=True, vllm_importance_sampling_mode="token_truncate")


def test_grpo_config_is_refused(tiny_model_dir):
    with pytest.raises(TypeError, match="GNIVOConfig"):
        GNIVOTrainer(model=tiny_model_dir, reward_funcs=lambda **kw: [], args=GRPOConfig(**CONFIG))


def test_defaults_follow_the_paper():
    config = GNIVOConfig(**CONFIG)
    assert (config.gnivo_alpha, config.num_generations, config.gnivo_prefix_unit) == (0.2, 4, "token")
    assert (config.gnivo_weight_normalization, config.gnivo_step_delimiter, config.beta) == ("softmax", "\n\n", 0.0)


def test_whole_group_buffering_is_trls_with_only_the_shuffle_changed(tiny_model_dir, tmp_path, monkeypatch):
    """``GroupBookkeepingMixin._prepare_inputs`` repeats ``GRPOTrainer._prepare_inputs`` (TRL shuffles single rows
    inside it, with no hook to shuffle groups instead). With both shuffles made the identity, the two buffer the
    same micro-batches: a TRL release that changes its buffering fails here."""
    import trl.trainer.grpo_trainer as grpo_trainer_module
    from trl import GRPOTrainer

    import gnivo_trl.group_bookkeeping as group_bookkeeping

    trainer = build_trainer(
        "gnivo", tiny_model_dir, str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    assert trainer._keeps_groups_whole and trainer.args.steps_per_generation == 2
    monkeypatch.setattr(grpo_trainer_module, "shuffle_sequence_dict", lambda batch: batch)
    monkeypatch.setattr(group_bookkeeping, "shuffle_whole_groups", lambda batch, group_size: batch)
    trainer.model.train()
    generation_batch = list(trainer.train_dataset.select(range(2)).repeat(4))
    buffered = {}
    for name, prepare in (
        ("ours", trainer._prepare_inputs),
        ("trl", lambda b: GRPOTrainer._prepare_inputs(trainer, b)),
    ):
        trainer._step, trainer._buffered_inputs = 0, None
        torch.manual_seed(0)
        prepare(generation_batch)
        buffered[name] = trainer._buffered_inputs
    assert len(buffered["ours"]) == len(buffered["trl"]) == 2
    for ours, trls in zip(buffered["ours"], buffered["trl"], strict=True):
        assert ours.keys() == trls.keys()
        for key, value in ours.items():
            assert torch.equal(value, trls[key]) if isinstance(value, torch.Tensor) else value == trls[key], key


@pytest.mark.parametrize("layout", ["one micro-batch", "accumulation, split groups"])
def test_every_completion_truncated_and_masked_gives_a_zero_loss_in_every_layout(layout, tiny_model_dir, tmp_path):
    """mask_truncated_completions=True with every completion truncated: no group has a unit (T_g = 0), so L_g = 0.
    The logged loss and gnivo/loss are 0, as GRPO's loss is, whether groups are whole (exact loss) or split over
    micro-batches (linearised rows), and nothing moves."""
    trainer = build_trainer(
        "gnivo", tiny_model_dir, str(tmp_path), mask_truncated_completions=True, **SINGLE_PROCESS_LAYOUTS[layout]
    )
    truncate_completions(trainer)
    assert max_magnitude(parameter_update(trainer)) == 0.0
    logged = trainer.state.log_history[0]
    assert logged["loss"] == 0.0 and logged["gnivo/loss"] == 0.0
