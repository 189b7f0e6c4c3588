"""PEFT / LoRA with both trainers: only the adapter trains, VIMPO's reference is the adapter-disabled model, and a
saved adapter reloads with ``PeftModel.from_pretrained`` to the same logits."""

import logging

import pytest
import torch
from peft import LoraConfig, PeftModel
from trainer_harness import build_trainer, record_scored_batches
from transformers import AutoModelForCausalLM

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _lora_trainer(algorithm: str, model_dir: str, output_dir: str, **overrides):
    settings = dict(max_steps=2, learning_rate=0.5)
    settings.update(overrides)
    return build_trainer(
        algorithm, model_dir, output_dir, trainer_kwargs=dict(peft_config=LoraConfig(**LORA)), **settings
    )


def _completion_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    """Log-probs of the completion tokens under ``model`` (float32, the trainer's temperature), computed from logits."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    num_completion = batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -num_completion - 1 : -1].float()
    logps = (logits / temperature).log_softmax(-1)
    return logps.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo"])
def test_lora_trains_only_the_adapter_and_reloads(algorithm, tiny_model_dir, tmp_path):
    trainer = _lora_trainer(algorithm, tiny_model_dir, str(tmp_path / "run"))
    model = trainer.model
    assert isinstance(model, PeftModel)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    trainer.train()

    after = dict(model.named_parameters())
    for name, value in before.items():
        if "lora_" in name:
            # LoRA's B starts at zero, so A moves from the second step on: two steps move both.
            assert not torch.equal(after[name].detach(), value), f"adapter weight {name} did not move"
        else:
            assert torch.equal(after[name].detach(), value), f"base weight {name} changed"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    # The saved adapter reloads onto the untouched base model and gives the same logits.
    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    assert (adapter_dir / "adapter_config.json").exists()
    assert not (adapter_dir / "model.safetensors").exists()  # only the adapter is saved
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir))
    ids = trainer.processing_class("What is 3 + 4? The answer is 7.", return_tensors="pt")["input_ids"]
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-4  # the adapter does change the logits


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["exact", "k3"])
def test_vimpo_reference_is_the_adapter_disabled_model(estimator, tiny_model_dir, tmp_path):
    trainer = _lora_trainer("vimpo", tiny_model_dir, str(tmp_path), vimpo_kl_estimator=estimator)
    assert trainer.ref_model is None  # no copy of the base model: the reference is the adapter switched off
    assert trainer.beta == 0.0 and trainer.args.beta == 0.0
    batches = record_scored_batches(trainer)
    trainer.train()
    assert len(batches) == 2
    batch = batches[-1]  # scored after the first optimizer step, when the adapter has moved
    model = trainer.model
    model.eval()
    mask = batch["completion_mask"].bool()
    with model.disable_adapter():
        base = _completion_logps(model, batch, trainer.temperature)
    adapted = _completion_logps(model, batch, trainer.temperature)
    # The frozen base model of a fresh load gives the same log-probs: the base weights never moved.
    fresh = _completion_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch, trainer.temperature)
    torch.testing.assert_close(base[mask], fresh[mask], rtol=0, atol=1e-5)

    # The adapter has moved the policy at the second generation batch (the stored log-probs are not the policy's)...
    assert (adapted - base)[mask].abs().max() > 1e-3
    # ...and the stored reference log-probs are the base model's, computed with the adapter disabled.
    torch.testing.assert_close(batch["vimpo_ref_logps"][mask], base[mask], rtol=0, atol=1e-5)
    assert torch.all(batch["vimpo_ref_logps"][~mask] == 0)
    # So the KL to the reference is positive at the second batch.
    assert batch["vimpo_token_kl"][mask].mean() > 0


@pytest.mark.slow
def test_vimpo_reference_head_under_modules_to_save_is_the_frozen_one(tiny_model_dir, tmp_path):
    """With ``modules_to_save=["lm_head"]`` the trainable copy of the head is the policy's and the original the
    reference's: the KL VIMPO scores and logs is the KL between the model with its adapter and with it disabled,
    against a float64 computation from both models' own logits (the saved head is moved first, so the two differ
    only there; the learning rate is 0, so the logged step sees exactly this model)."""
    trainer = build_trainer(
        "vimpo",
        tiny_model_dir,
        str(tmp_path),
        trainer_kwargs=dict(peft_config=LoraConfig(**LORA, modules_to_save=["lm_head"])),
        learning_rate=0.0,
    )
    model = trainer.model
    saved_head = model.base_model.model.lm_head.modules_to_save["default"]
    torch.manual_seed(0)
    with torch.no_grad():
        saved_head.weight.add_(0.5 * torch.randn_like(saved_head.weight))
    batches = record_scored_batches(trainer)
    trainer.train()
    batch = batches[0]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    C = batch["completion_ids"].size(1)
    model.eval()
    with torch.no_grad():
        policy = (model(input_ids=ids, attention_mask=attention).logits[:, -C - 1 : -1].double()).log_softmax(-1)
        with model.disable_adapter():
            ref = (model(input_ids=ids, attention_mask=attention).logits[:, -C - 1 : -1].double()).log_softmax(-1)
    mask = batch["completion_mask"].bool()
    true_kl = (policy.exp() * (policy - ref)).sum(-1)
    assert true_kl[mask].mean() > 0.5
    torch.testing.assert_close(batch["vimpo_token_kl"][mask].double(), true_kl[mask], rtol=1e-4, atol=1e-6)
    logged = [entry for entry in trainer.state.log_history if "vimpo/kl" in entry][0]["vimpo/kl"]
    assert logged == pytest.approx(true_kl[mask].mean().item(), rel=1e-4)


@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo"])
def test_an_adapter_that_unties_a_tied_head_is_warned_at_construction(algorithm, tiny_model_dir, tmp_path, caplog):
    """The tiny model ties its head to its input embeddings; modules_to_save=["lm_head"] makes PEFT untie them (the
    adapter then holds a full copy of the head). Without it, or with PEFT's ensure_weight_tying=True, no warning."""

    def untying_warnings(**lora) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gnivo_trl.group_bookkeeping"):
            build_trainer(
                algorithm, tiny_model_dir, str(tmp_path), trainer_kwargs=dict(peft_config=LoraConfig(**LORA, **lora))
            )
        return [record.getMessage() for record in caplog.records if "tie_word_embeddings" in record.getMessage()]

    (warning,) = untying_warnings(modules_to_save=["lm_head"])
    assert "copy of the LM head" in warning and "ensure_weight_tying=True" in warning
    assert "leave the LM head out of modules_to_save" in warning
    assert untying_warnings() == []
    assert untying_warnings(modules_to_save=["lm_head"], ensure_weight_tying=True) == []
