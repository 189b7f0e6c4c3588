"""gnivo_trl.scoring: TRL's fused head found through the wrappers users' setups add, TRL's private helpers imported
where used, the backbones' hidden states and MoE router loss, and the one float32 pass of both LM heads against
float64 full-softmax references (values and gradients, several tiles of tokens and vocabulary, every logit transform,
bias, bf16 inputs and autocast, no token at all). The trainer-level scores are tested against float64 references in
test_vimpo_trainer.py, test_vimpo_options.py and test_credit.py."""

import math

import pytest
import torch
from trainer_harness import build_trainer, save_tiny_family_model
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


def test_a_missing_private_trl_helper_names_the_supported_versions():
    assert trl_private("trl.kernels.chunked_divergence", "_project") is not None
    with pytest.raises(ImportError) as error:
        trl_private("trl.kernels.chunked_divergence", "_renamed_in_a_later_release")
    assert SUPPORTED_TRL in str(error.value) and "pip install" in str(error.value)


def test_completion_hidden_states_are_the_backbones_at_the_predicting_positions(tiny_model_dir):
    model = _model(tiny_model_dir)
    torch.manual_seed(0)
    input_ids = torch.randint(5, 200, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    states = scoring.completion_hidden_states(
        model, scoring.fused_head_settings(model), input_ids, attention_mask, valid
    )
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, -5:-1]
    torch.testing.assert_close(states.hidden, hidden[valid], rtol=0, atol=0)
    assert states.hidden.requires_grad and states.aux_loss is None


def test_router_loss_is_the_models_own(tmp_path):
    """MoE: the load-balancing loss from the backbone's router logits is the one the model's own forward returns
    (its modeling module's function, its expert counts, the attention mask's padding left out)."""
    model = AutoModelForCausalLM.from_pretrained(save_tiny_family_model(tmp_path / "mixtral", "mixtral"))
    add_fused_lm_head(model)
    torch.manual_seed(0)
    input_ids = torch.randint(5, 200, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # a left-padded prompt
    valid = torch.ones(2, 4, dtype=torch.bool)
    states = scoring.completion_hidden_states(
        model, scoring.fused_head_settings(model), input_ids, attention_mask, valid, output_router_logits=True
    )
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
    assert expected > 0
    torch.testing.assert_close(states.aux_loss.detach(), expected, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# One float32 pass of both LM heads
# ----------------------------------------------------------------------------------------------------------------------


def _transform64(logits: torch.Tensor, settings: scoring.FusedHeadSettings) -> torch.Tensor:
    """float64 log-softmax of raw logits under TRL's fused-head transform (scale, soft-cap, temperature)."""
    logits = logits.double() * settings.logit_scale
    if settings.final_logit_softcapping is not None:
        cap = settings.final_logit_softcapping
        logits = cap * torch.tanh(logits / cap)
    return (logits / settings.temperature).log_softmax(-1)


def _inputs(num_tokens=13, hidden=8, vocab=50, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator)

    policy_head = scoring.LMHead(
        randn(vocab, hidden).requires_grad_(), randn(vocab).requires_grad_() if bias else None
    )
    ref_head = scoring.LMHead(randn(vocab, hidden), randn(vocab) if bias else None)
    policy_hidden = randn(num_tokens, hidden, scale=2.0).requires_grad_()
    ref_hidden = randn(num_tokens, hidden, scale=2.0)
    targets = torch.randint(0, vocab, (num_tokens,), generator=generator)
    return policy_hidden, policy_head, ref_hidden, ref_head, targets


def _expected(policy_hidden, policy_head, ref_hidden, ref_head, targets, settings, topk):
    def log_probs(hidden, head):
        logits = hidden.double() @ head.weight.double().T
        return _transform64(logits if head.bias is None else logits + head.bias.double(), settings)

    p, q = log_probs(policy_hidden, policy_head), log_probs(ref_hidden, ref_head)
    index = targets[:, None]
    candidates = p.topk(min(topk, p.size(-1)), dim=-1).indices
    p_c, q_c = p.gather(-1, candidates), q.gather(-1, candidates)
    return {
        "log_probs": p.gather(-1, index).squeeze(-1),
        "ref_log_probs": q.gather(-1, index).squeeze(-1),
        "entropy": -(p.exp() * p).sum(-1),
        "kl": (p.exp() * (p - q)).sum(-1),
        "candidate_kl": (p_c.exp() * (p_c - q_c)).sum(-1),
        "probability_square_sums": (2 * p).exp().sum(-1),
    }


SETTINGS = {
    "plain": scoring.FusedHeadSettings(1.0, 1.0, None, False, "base_model"),
    # Granite-like scale, Gemma-like soft-cap (small, so that it bends the logits) and a temperature.
    "scaled-capped-tempered": scoring.FusedHeadSettings(0.7, 0.5, 2.0, False, "base_model"),
}


@pytest.mark.parametrize("settings_name", list(SETTINGS))
@pytest.mark.parametrize(("chunk_size", "vocab_tile", "bias"), [(1024, 32768, True), (5, 16, True), (4, 7, False)])
def test_one_pass_scores_and_gradient_equal_a_float64_full_softmax(settings_name, chunk_size, vocab_tile, bias):
    """Every output against float64 full softmaxes, with several token chunks and vocabulary tiles (a ragged last
    one); the gradient of the policy's log-probs with respect to its hidden states, weight and bias against float64
    autograd, and none of the other outputs differentiable."""
    settings = SETTINGS[settings_name]
    policy_hidden, policy_head, ref_hidden, ref_head, targets = _inputs(bias=bias)
    scores = scoring.policy_reference_scores(
        policy_hidden,
        policy_head,
        settings,
        ref_hidden,
        ref_head,
        settings,
        targets,
        candidate_topk=6,
        probability_square_sums=True,
        chunk_size=chunk_size,
        vocab_tile=vocab_tile,
    )
    expected = _expected(policy_hidden, policy_head, ref_hidden, ref_head, targets, settings, 6)
    assert expected["kl"].min() > 0.1 and expected["candidate_kl"].sub(expected["kl"]).abs().max() > 1e-2
    for name, value in expected.items():
        got = getattr(scores, name)
        assert got.dtype == torch.float32 and got.shape == targets.shape, name
        torch.testing.assert_close(got.double(), value.detach(), rtol=1e-5, atol=1e-5, msg=name)
        assert got.requires_grad == (name == "log_probs"), name

    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    leaves = [policy_hidden, *(tensor for tensor in policy_head if tensor is not None)]
    got = torch.autograd.grad((scores.log_probs * weights).sum(), leaves)
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    head64 = scoring.LMHead(leaves64[1], leaves64[2] if bias else None)
    log_probs64 = _expected(leaves64[0], head64, ref_hidden, ref_head, targets, settings, 6)["log_probs"]
    expected_grads = torch.autograd.grad((log_probs64 * weights.double()).sum(), leaves64)
    for value, reference in zip(got, expected_grads, strict=True):
        torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-5)


def test_identical_models_give_exactly_zero_log_ratio_and_kl():
    """Policy = reference (same hidden states and head): rho and both KLs are exactly 0, not rounding noise."""
    policy_hidden, policy_head, _, _, targets = _inputs()
    settings = SETTINGS["scaled-capped-tempered"]
    scores = scoring.policy_reference_scores(
        policy_hidden,
        policy_head,
        settings,
        policy_hidden,
        policy_head,
        settings,
        targets,
        candidate_topk=4,
        chunk_size=5,
        vocab_tile=16,
    )
    assert torch.equal(scores.log_probs.detach(), scores.ref_log_probs)
    assert scores.kl.abs().max() == 0 and scores.candidate_kl.abs().max() == 0


def test_candidate_set_over_the_whole_vocabulary_is_the_exact_kl():
    policy_hidden, policy_head, ref_hidden, ref_head, targets = _inputs()
    settings = SETTINGS["plain"]
    scores = scoring.policy_reference_scores(
        policy_hidden,
        policy_head,
        settings,
        ref_hidden,
        ref_head,
        settings,
        targets,
        candidate_topk=10**6,
        vocab_tile=16,
    )
    torch.testing.assert_close(scores.candidate_kl, scores.kl, rtol=1e-5, atol=1e-6)


def test_no_token_still_runs_and_keeps_the_policy_connected():
    """A rank without a valid token (ZeRO-3 needs every rank to run the same gathers and backward): empty scores,
    and the scattered log-probs still reach the policy's head with a zero gradient."""
    policy_hidden, policy_head, ref_hidden, ref_head, targets = _inputs(num_tokens=0)
    settings = SETTINGS["plain"]
    scores = scoring.policy_reference_scores(
        policy_hidden,
        policy_head,
        settings,
        ref_hidden,
        ref_head,
        settings,
        targets,
        candidate_topk=3,
        probability_square_sums=True,
    )
    assert all(value.shape == (0,) for value in scores)
    per_position = torch.zeros(2, 3).masked_scatter(torch.zeros(2, 3, dtype=torch.bool), scores.log_probs)
    per_position.sum().backward()
    assert policy_head.weight.grad is not None and policy_head.weight.grad.abs().max() == 0


def test_logits_are_never_rounded_to_the_autocast_dtype():
    """Under bf16 autocast with float32 inputs, and with bf16 inputs, the scores are those of float32 logits of the
    stored values (bf16 x bf16 products accumulated in float32), not of bf16 logit tiles. The logits are of a real
    model's size (about 20), where bf16 tiles would be off by about 0.05."""
    policy_hidden, policy_head, ref_hidden, ref_head, targets = _inputs(hidden=64, vocab=300)
    policy_head = scoring.LMHead(policy_head.weight.detach() * 0.5, policy_head.bias.detach())
    settings = SETTINGS["plain"]
    args = (policy_hidden.detach(), policy_head, settings, ref_hidden, ref_head, settings, targets)
    expected = _expected(*args[:2], *args[3:5], targets, settings, 1)
    assert (policy_hidden.detach() @ policy_head.weight.T).abs().max() > 20
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = scoring.policy_reference_scores(*args)
    for name in ("log_probs", "ref_log_probs", "kl"):
        torch.testing.assert_close(getattr(scores, name).double(), expected[name], rtol=1e-5, atol=1e-5, msg=name)

    def bf16(head):
        return scoring.LMHead(head.weight.bfloat16(), head.bias.bfloat16())

    inputs = (policy_hidden.detach().bfloat16(), bf16(policy_head), ref_hidden.bfloat16(), bf16(ref_head))
    scores = scoring.policy_reference_scores(*inputs[:2], settings, *inputs[2:], settings, targets)
    expected = _expected(*inputs, targets, settings, 1)
    for name in ("log_probs", "ref_log_probs", "kl"):
        torch.testing.assert_close(getattr(scores, name).double(), expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_heads_on_different_devices_different_temperatures_or_vocabularies_are_refused():
    """A ``device_map`` that put the policy's head and the reference's apart cannot run: refused before projecting
    anything, with the fix; so are models prepared at two temperatures, and two vocabularies."""
    hidden, targets = torch.randn(3, 8), torch.zeros(3, dtype=torch.long)
    on_cpu = scoring.LMHead(torch.randn(11, 8), None)
    elsewhere = scoring.LMHead(torch.empty(11, 8, device="meta"), None)
    settings = SETTINGS["plain"]
    scoring.check_heads_on_one_device(on_cpu, on_cpu)
    with pytest.raises(ValueError, match="must be on one device") as error:
        scoring.policy_reference_scores(hidden, on_cpu, settings, hidden, elsewhere, settings, targets)
    assert "device_map" in str(error.value)
    with pytest.raises(ValueError, match="temperature 1.0 and the reference's by 0.7"):
        scoring.policy_reference_scores(
            hidden, on_cpu, settings, hidden, on_cpu, settings._replace(temperature=0.7), targets
        )
    with pytest.raises(ValueError, match="11 rows and the reference's 12"):
        other = scoring.LMHead(torch.randn(12, 8), None)
        scoring.policy_reference_scores(hidden, on_cpu, settings, hidden, other, settings, targets)
    assert math.isfinite(
        float(scoring.policy_reference_scores(hidden, on_cpu, settings, hidden, on_cpu, settings, targets).kl.sum())
    )
