"""gnivo_trl.scoring: TRL's fused head found through the wrappers users' setups add, the heads' devices, and TRL's
private helpers imported where used (the scores themselves are tested against float64 references in
test_vimpo_trainer.py, test_vimpo_options.py and test_credit.py)."""

import pytest
import torch
from trainer_harness import build_trainer
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from gnivo_trl import scoring
from gnivo_trl._trl_private import SUPPORTED_TRL, trl_private


def _model(tiny_model_dir: str, temperature: float = 0.7):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=True)
    return model


def test_settings_are_read_through_accelerates_mixed_precision_wrapper(tiny_model_dir, tmp_path):
    """Under bf16 (GRPOConfig's default on a GPU) accelerate wraps the patched forward in autocast and an fp32
    output cast; the settings TRL installed are still found, down the ``__wrapped__`` chain."""
    model = _model(tiny_model_dir)
    expected = scoring.fused_head_settings(model)
    # The accelerator of a trainer built as on a GPU (bf16=True); a second Accelerator could not change the
    # process's mixed precision once another test set it.
    accelerator = build_trainer("gnivo", tiny_model_dir, str(tmp_path), bf16=True).accelerator
    assert accelerator.mixed_precision == "bf16" and accelerator.native_amp
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    assert prepared.forward.__name__ != "_fused_forward"  # accelerate's wrapper is outermost
    assert scoring.has_fused_head(prepared)
    assert scoring.fused_head_settings(prepared) == expected
    assert expected == scoring.FusedHeadSettings(0.7, 1.0, None, True, "base_model")


def test_a_model_without_trls_head_is_refused_with_the_likely_causes(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not scoring.has_fused_head(model)
    with pytest.raises(RuntimeError) as error:
        scoring.fused_head_settings(model)
    message = str(error.value)
    assert "add_fused_lm_head" in message and "__wrapped__" in message and SUPPORTED_TRL in message


def test_heads_on_different_devices_are_refused():
    """A ``device_map`` that put the policy's head and the reference's apart cannot run on CPU: the KL refuses it
    before projecting anything, with the fix."""
    hidden = torch.randn(3, 8)
    on_cpu = scoring.LMHead(torch.randn(11, 8), None)
    elsewhere = scoring.LMHead(torch.empty(11, 8, device="meta"), None)
    settings = scoring.FusedHeadSettings(1.0, 1.0, None, False, "base_model")
    scoring.check_heads_on_one_device(on_cpu, on_cpu)
    for kl in (scoring.exact_token_kl, scoring.candidate_set_token_kl):
        extra = (4,) if kl is scoring.candidate_set_token_kl else ()
        with pytest.raises(ValueError, match="must be on one device") as error:
            kl(hidden, on_cpu, settings, hidden, elsewhere, settings, *extra)
        assert "device_map" in str(error.value)


def test_a_missing_private_trl_helper_names_the_supported_versions():
    assert trl_private("trl.kernels.chunked_divergence", "_project") is not None
    with pytest.raises(ImportError) as error:
        trl_private("trl.kernels.chunked_divergence", "_renamed_in_a_later_release")
    assert SUPPORTED_TRL in str(error.value) and "pip install" in str(error.value)


def test_fused_forward_scores_are_trls_log_probs_with_the_backbones_hidden_states(tiny_model_dir):
    """The log-probs are those of the model's own forward at the head's temperature (float64 reference), and the
    hidden states are the backbone's at the positions that predict the valid completion tokens."""
    model = _model(tiny_model_dir, temperature=0.7)
    torch.manual_seed(0)
    input_ids = torch.randint(5, 200, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    scores = scoring.fused_forward_scores(
        model, model, scoring.fused_head_settings(model), input_ids, attention_mask, valid
    )
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -5:-1].double()
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, -5:-1]
    expected = (logits / 0.7).log_softmax(-1).gather(-1, input_ids[:, -4:, None]).squeeze(-1) * valid
    torch.testing.assert_close(scores.log_probs.double(), expected, rtol=1e-5, atol=1e-6)
    assert scores.log_probs.requires_grad and scores.entropy is None and scores.aux_loss is None
    torch.testing.assert_close(scores.hidden, hidden[valid], rtol=0, atol=0)
    assert not scores.hidden.requires_grad
