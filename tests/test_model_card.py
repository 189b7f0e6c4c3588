"""The model card both trainers write (TRL's, through `GroupBookkeepingMixin.create_model_card` / `save_model`):
written by `save_model` as well as at checkpoints, naming a base model loaded from a local folder and a model not
pushed by where they are, and kept (not PEFT's blank template) for a LoRA adapter."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from trainer_harness import build_trainer

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo"])
def test_save_model_writes_the_card_when_no_checkpoint_does(algorithm, tiny_model_dir, tmp_path):
    """save_strategy="no" (the harness's): TRL writes its card only at checkpoints and on push."""
    trainer = build_trainer(algorithm, tiny_model_dir, str(tmp_path / "run"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "# Model Card for final" in card
    assert f"- {algorithm}\n" in card and "## Citations" in card
    assert f"trained with {dict(gnivo='GN-IVO', vimpo='VIMPO')[algorithm]}" in card
    assert not (tmp_path / "run" / "README.md").exists()  # only where the model was saved


def test_a_local_base_model_and_a_model_not_pushed_are_named_not_none(tiny_model_dir, tmp_path):
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path / "run"))
    trainer.create_model_card(model_name="run")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "None" not in card
    assert f"a fine-tuned version of the local model `{tiny_model_dir.rstrip('/').split('/')[-1]}`" in card
    assert f'pipeline("text-generation", model="{tmp_path / "run"}"' in card
    assert "base_model:" not in card  # a local path is no Hub id: the metadata stays without it, as in TRL


def test_a_hub_base_model_and_a_pushed_model_keep_trls_links(tiny_model_dir, tmp_path):
    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path / "run"))
    trainer.model.config._name_or_path = "Qwen/Qwen2.5-Math-1.5B"
    trainer.hub_model_id = "me/qwen-gnivo"
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "[Qwen/Qwen2.5-Math-1.5B](https://huggingface.co/Qwen/Qwen2.5-Math-1.5B)" in card
    assert 'model="me/qwen-gnivo"' in card and "base_model: Qwen/Qwen2.5-Math-1.5B" in card


@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo"])
def test_a_lora_adapters_card_is_the_methods_with_peft_metadata(algorithm, tiny_model_dir, tmp_path):
    """PEFT writes its blank template when no card exists; the method's card is written first, and PEFT adds its
    metadata to it, as at TRL's checkpoints."""
    trainer = build_trainer(
        algorithm, tiny_model_dir, str(tmp_path / "run"), trainer_kwargs=dict(peft_config=LoraConfig(**LORA))
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    card = (tmp_path / "adapter" / "README.md").read_text()
    name = {"gnivo": "GN-IVO", "vimpo": "VIMPO"}[algorithm]
    assert f"trained with {name}" in card and "## Citations" in card and "@software{vonwerra2020trl" in card
    assert "library_name: peft" in card and "- lora" in card  # PEFT's metadata
    assert "[More Information Needed]" not in card  # PEFT's blank template
