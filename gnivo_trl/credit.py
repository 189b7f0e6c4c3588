"""Where did it go wrong? The credit a policy implies for each token and each reasoning step of a completion.

A policy trained with a KL-regularised objective against a reference `pi_ref` implies a reward for every token it
emits: the log-ratio `log pi_theta(y_t | y_<t) - log pi_ref(y_t | y_<t)` (the implicit process reward, any policy),
or, as VIMPO's value reads it, that log-ratio minus the exact `KL(pi_theta || pi_ref)` at the same position (the
log-ratio centred on its expectation under the policy, so a token the policy merely prefers as much as it prefers
everything at that position gets zero). Summed over the tokens of a reasoning step they give the step's credit; the
running sum over steps is the implied prefix value. A step whose credit is low is where the policy "thinks" the
completion went wrong.

Pure functions (plain tensors, float32 sums, no Python loop over positions):

- [`token_log_ratios`][gnivo_trl.credit.token_log_ratios],
  [`centred_token_rewards`][gnivo_trl.credit.centred_token_rewards]: per-token implied rewards `(B, T)`, in nats.
- [`step_boundaries`][gnivo_trl.credit.step_boundaries]: the tokens that close a step, exactly as
  `GNIVOConfig(gnivo_prefix_unit="step")` finds them (`gnivo_trl.steps.step_unit_ends` +
  [`gnivo_trl.losses.unit_boundaries`][gnivo_trl.losses.unit_boundaries]).
- [`step_credit`][gnivo_trl.credit.step_credit]: per-step sums and the prefix value curve `(B, S)`;
  [`token_step_index`][gnivo_trl.credit.token_step_index].

Model level: [`score_completions`][gnivo_trl.credit.score_completions] scores completions of prompts under a policy and
its reference in batches, as `VIMPOTrainer` scores them (`gnivo_trl.scoring`: each backbone once, then one float32
pass of both LM heads for the log-probabilities and the exact KL), never materialising `(B, T, V)` logits, on CPU or
GPU.
Those functions read the logit transform (temperature, logit scale, soft-cap, float32 head) off the forward that TRL's
`add_fused_lm_head` installed, so a plain `from_pretrained` model must be prepared first:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

from gnivo_trl.credit import completion_credit, prepare_for_scoring
from gnivo_trl.credit import render_html, score_completions

# a trained run (its output_dir, or its Hub id) and the model it started
# from; scoring a model against itself gives zero credit everywhere
run_dir, base_dir = "your-name/qwen-gnivo", "Qwen/Qwen2.5-Math-1.5B"
tokenizer = AutoTokenizer.from_pretrained(base_dir)
# prepare_for_scoring calls trl.trainer.utils.add_fused_lm_head(model, ...)
# unless TRL already did; generation is unchanged by it
run = AutoModelForCausalLM.from_pretrained(run_dir)
policy = prepare_for_scoring(run, temperature=1.0)
base = AutoModelForCausalLM.from_pretrained(base_dir)
reference = prepare_for_scoring(base, temperature=1.0)
scores = score_completions(policy, reference, tokenizer, ["3+4"], ["3+4=7"])
html = render_html(completion_credit(scores, row=0, readout="centred"))
```

Pictures: [`render_html`][gnivo_trl.credit.render_html] (every token shaded by its implied reward, steps boxed with
their totals, a legend; all model text HTML-escaped) and [`render_png`][gnivo_trl.credit.render_png] (per-step bars and
the value curve, matplotlib's Agg backend).

Command line (samples a completion with `model.generate` when `--completion` is not given):

```bash
python -m gnivo_trl.credit --model RUN_DIR --reference BASE_DIR \\
    --prompt "3+4*2-5" --output-dir credit_out
```

writes `credit_out/credit.html` and `credit_out/credit.png` (both readouts) and `credit_out/credit.json`.

During training, [`CreditCallback`][gnivo_trl.credit.CreditCallback] (a `transformers.TrainerCallback`) renders the
credit of a few freshly sampled completions every N optimizer steps into `<output_dir>/credit/`.
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from transformers import TrainerCallback

from . import scoring
from .losses import prefix_log_ratios, unit_boundaries
from .steps import TokenTextCache, step_unit_ends

logger = logging.getLogger(__name__)

__all__ = [
    "READOUTS",
    "CompletionCredit",
    "CreditCallback",
    "CreditScores",
    "StepCredit",
    "centred_token_rewards",
    "completion_credit",
    "prepare_for_scoring",
    "readout_token_values",
    "render_html",
    "render_png",
    "sample_completions",
    "score_completions",
    "step_boundaries",
    "step_credit",
    "token_log_ratios",
    "token_step_index",
]

Readout = Literal["log_ratio", "centred", "log_prob"]
READOUTS: tuple[str, ...] = ("log_ratio", "centred", "log_prob")
READOUT_NAMES = {
    "log_ratio": "log pi_theta - log pi_ref (implicit process reward)",
    "centred": "log pi_theta - log pi_ref - KL(pi_theta || pi_ref) (VIMPO-centred)",
    "log_prob": "log pi_theta (the policy's own likelihood; not an implied reward)",
}


# --------------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------------


def token_log_ratios(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The implicit process reward of every token: `log pi_theta - log pi_ref`, 0 where `mask` is 0.

    Args:
        logp: `(B, T)` log pi_theta of the sampled tokens, in nats (any float dtype).
        ref_logp: `(B, T)` log pi_ref of the same tokens.
        mask: `(B, T)` 0/1 (or bool), 1 on completion tokens.

    Returns:
        float32 `(B, T)`, in nats; differentiable through both inputs (callers pass detached scores).
    """
    # where() rather than a product: padded positions may hold -inf or garbage.
    return torch.where(mask.bool(), logp.float() - ref_logp.float(), 0.0)


def centred_token_rewards(
    logp: torch.Tensor, ref_logp: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """VIMPO's per-token implied reward `rho / beta - kappa / beta = log pi_theta - log pi_ref - KL(pi_theta ||
    pi_ref)`.

    The KL is the policy's expectation of the log-ratio at that position, so this is the sampled token's log-ratio
    minus its mean over the vocabulary under the policy: positive when the policy upweighted this token more than it
    upweighted its alternatives on average (VIMPO's `delta = rho - kappa` without `beta`).

    Args:
        logp: `(B, T)` log-probabilities of the sampled tokens under the policy.
        ref_logp: `(B, T)` log-probabilities of the same tokens under the reference.
        token_kl: `(B, T)` exact per-token `KL(pi_theta || pi_ref)` over the full vocabulary, in nats.
        mask: `(B, T)` 0/1 (or bool), 1 on completion tokens.

    Returns:
        float32 `(B, T)`, in nats, 0 where `mask` is 0.
    """
    return torch.where(mask.bool(), logp.float() - ref_logp.float() - token_kl.float(), 0.0)


def step_boundaries(
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    token_texts: TokenTextCache | Any,
    delimiter: str = "\n\n",
) -> torch.Tensor:
    """The tokens that close a reasoning step, exactly as `GNIVOConfig(gnivo_prefix_unit="step")` finds them.

    `gnivo_trl.steps.step_unit_ends` (a token closes a step when an occurrence of `delimiter` ends inside its
    decoded text) followed by [`gnivo_trl.losses.unit_boundaries`][gnivo_trl.losses.unit_boundaries] (the last unmasked
    token always closes a step).

    Args:
        completion_ids: `(B, T)` token ids.
        mask: `(B, T)` 0/1 completion mask.
        token_texts: a `gnivo_trl.steps.TokenTextCache`, or a tokenizer (wrapped in one).
        delimiter: the step delimiter (`gnivo_step_delimiter`).

    Returns:
        `(B, T)` bool, True on the last token of every step.
    """
    if not isinstance(token_texts, TokenTextCache):
        token_texts = TokenTextCache(token_texts)
    return unit_boundaries(mask, step_unit_ends(completion_ids, mask, token_texts, delimiter))


class StepCredit(NamedTuple):
    """Per-step credit of a batch of completions (all float32, detached only if the inputs were).

    Attributes:
        step_totals: `(B, S)` sum of the token values of each step, in nats; 0 past a row's last step.
        value_curve: `(B, S)` implied prefix value: the cumulative sum of `step_totals` up to and including each
            step; held at its final value past a row's last step.
        num_steps: `(B,)` long, the number of steps of each row (0 for a fully masked row).
        valid: `(B, S)` bool, True for the steps a row has.

    Examples:
        ```python
        import torch

        from gnivo_trl.credit import step_credit

        values = torch.tensor([[0.5, -2.0, 0.1, 0.2]])  # per-token implied rewards
        ends = torch.tensor([[False, True, False, True]])  # two steps of two tokens
        credit = step_credit(values, torch.ones_like(values), ends)
        print(credit.step_totals, credit.value_curve)  # [-1.5, 0.3] and [-1.5, -1.2]
        ```
    """

    step_totals: torch.Tensor
    value_curve: torch.Tensor
    num_steps: torch.Tensor
    valid: torch.Tensor


def step_credit(token_values: torch.Tensor, mask: torch.Tensor, step_ends: torch.Tensor | None) -> StepCredit:
    """Per-step sums of per-token values and the prefix value curve, on the step units GN-IVO uses.

    The cumulative sum is [`gnivo_trl.losses.prefix_log_ratios`][gnivo_trl.losses.prefix_log_ratios] (float32, one
    `cumsum` and one gather, no Python loop over positions) applied to `token_values` with a zero "old" policy, so
    steps here are exactly the loss's prefix units; step totals are the differences of consecutive prefix values.

    Args:
        token_values: `(B, T)` per-token values (e.g. [`token_log_ratios`][gnivo_trl.credit.token_log_ratios]), in
            nats.
        mask: `(B, T)` 0/1 completion mask.
        step_ends: `(B, T)` bool marking tokens that close a step
            ([`step_boundaries`][gnivo_trl.credit.step_boundaries]); None makes every token its own step.

    Returns:
        [`StepCredit`][gnivo_trl.credit.StepCredit], with `S` the largest number of steps of a row (at least 1).
    """
    prefix = prefix_log_ratios(token_values, torch.zeros_like(token_values), mask, step_ends)
    value_curve = prefix.values
    step_totals = torch.diff(value_curve, dim=1, prepend=value_curve.new_zeros(value_curve.size(0), 1))
    steps = torch.arange(value_curve.size(1), device=value_curve.device)
    valid = steps[None, :] < prefix.num_units[:, None]
    return StepCredit(step_totals, value_curve, prefix.num_units, valid)


def token_step_index(mask: torch.Tensor, step_ends: torch.Tensor | None) -> torch.Tensor:
    """The 0-based step each token belongs to, `(B, T)` long; -1 on masked positions.

    A token belongs to the step its closing token closes (the delimiter's tokens belong to the step they end).
    """
    closes = unit_boundaries(mask, step_ends).long()
    index = closes.cumsum(dim=1) - closes  # number of steps closed strictly before this token
    return torch.where(mask.bool(), index, -1)


# --------------------------------------------------------------------------------------------------------------------
# Model-level scoring
# --------------------------------------------------------------------------------------------------------------------


def prepare_for_scoring(
    model: torch.nn.Module, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False
) -> torch.nn.Module:
    """Install TRL's fused LM head on a plain causal LM (in place; returns it), unless TRL already did.

    `gnivo_trl.scoring` reads the logit transform off the forward that `trl.trainer.utils.add_fused_lm_head`
    patched, as `GRPOTrainer` does at construction; a model loaded with `from_pretrained` lacks it. Use the
    temperature the policy was trained (and sampled) at: the implied rewards are those of the tempered
    distributions. `model.generate` and the plain forward are unchanged by the patch. A model that already carries
    TRL's head (e.g. `trainer.model`) is returned untouched, whatever the arguments.
    """
    if not scoring.has_fused_head(model):  # anywhere in its forward chain: never patch TRL's head twice
        from trl.trainer import add_fused_lm_head

        add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32)
    return model


@dataclass
class CreditScores:
    """Per-token scores of a batch of completions under a policy and its reference (CPU tensors, no gradient).

    Attributes:
        prompts: the prompt text of each row (after the chat template).
        completion_ids: `(B, C)` long token ids, right-padded.
        mask: `(B, C)` float32, 1 on completion tokens (EOS included when it was part of the completion).
        logp: `(B, C)` float32 log pi_theta of each token, nats, 0 where masked.
        ref_logp: `(B, C)` float32 log pi_ref of each token.
        token_kl: `(B, C)` float32 exact `KL(pi_theta || pi_ref)` at each position, nats.
        step_ends: `(B, C)` bool, the tokens that close a step ([`step_boundaries`][gnivo_trl.credit.step_boundaries]).
        tokens: decoded text of each row's completion tokens (masked positions left out).

    Examples:
        ```python
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gnivo_trl.credit import prepare_for_scoring, score_completions
        from gnivo_trl.testing import save_tiny_model

        # in practice: a trained run and the base model it started from
        run_dir = save_tiny_model("tiny-run", seed=1)
        base_dir = save_tiny_model("tiny-base", seed=0)
        policy = prepare_for_scoring(AutoModelForCausalLM.from_pretrained(run_dir))
        reference = prepare_for_scoring(AutoModelForCausalLM.from_pretrained(base_dir))
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        scores = score_completions(policy, reference, tokenizer, ["1+1"], ["2"])
        print(scores.token_kl.shape)  # (1, C)
        ```
    """

    prompts: list[str]
    completion_ids: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    ref_logp: torch.Tensor
    token_kl: torch.Tensor
    step_ends: torch.Tensor
    tokens: list[list[str]]


def _prompt_text(tokenizer, prompt: str | Sequence[dict]) -> str:
    """TRL's convention: chat messages go through the chat template with the generation prompt, text is used as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)


def _is_token_ids(row) -> bool:
    return not isinstance(row, str) and len(row) > 0 and not isinstance(row[0], dict)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_right(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


@torch.no_grad()
def score_completions(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[dict] | Sequence[int]],
    completions: Sequence[str | Sequence[int]],
    *,
    step_delimiter: str = "\n\n",
    append_eos: bool = True,
    batch_size: int = 64,
    kl_chunk_size: int = 1024,
) -> CreditScores:
    """Score `completions` of `prompts` under `model` and `reference` on the trainers' TRL kernels.

    Per batch of `batch_size` rows, exactly what `VIMPOTrainer` computes at loss time: the backbone of each
    model (`gnivo_trl.scoring.completion_hidden_states`) on prompt + completion (prompts left-padded, completions
    right-padded, as TRL lays them out), then one float32 pass of both LM heads
    (`gnivo_trl.scoring.policy_reference_scores`, `kl_chunk_size` tokens per tile) for the sampled tokens'
    log-probabilities and the exact full-vocabulary KL: no `(B, T, V)` tensor. Both
    models must carry TRL's fused head (see [`prepare_for_scoring`][gnivo_trl.credit.prepare_for_scoring]: call it on
    plain `from_pretrained` models first; it raises otherwise) and share `tokenizer`'s vocabulary. Runs on the models'
    device (CPU or GPU; inputs go to `model`'s device, so put both models on one device), in eval mode (restored
    afterwards).

    Args:
        model: the policy (a causal LM with TRL's fused head).
        reference: the reference (e.g. the warm start the policy was trained from), prepared the same way.
        tokenizer (PreTrainedTokenizerBase): the tokenizer of both models.
        prompts: chat messages (through the chat template, generation prompt added), plain text, or token ids,
            per row.
        completions: text (tokenized without special tokens, EOS appended when `append_eos`) or token ids (used
            as given: pass generated ids to score exactly what was sampled), per row.
        step_delimiter: what ends a step (`gnivo_step_delimiter`).
        append_eos: append the EOS token to text completions (TRL scores the EOS a completion ended with).
        batch_size: rows per forward.
        kl_chunk_size: tokens per tile of the heads' pass.

    Returns:
        [`CreditScores`][gnivo_trl.credit.CreditScores] on CPU, `C` the longest completion.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: give one prompt per completion.")
    policy_settings = scoring.fused_head_settings(model)
    ref_settings = scoring.fused_head_settings(reference)
    prompt_rows, prompt_texts = [], []
    for prompt in prompts:
        if _is_token_ids(prompt):
            prompt_rows.append([int(t) for t in prompt])
            prompt_texts.append(tokenizer.decode(prompt_rows[-1], skip_special_tokens=False))
        else:
            prompt_texts.append(_prompt_text(tokenizer, prompt))
            prompt_rows.append(tokenizer(prompt_texts[-1], add_special_tokens=False)["input_ids"])
    completion_rows = []
    for completion in completions:
        if isinstance(completion, str):
            ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            completion_rows.append(ids + ([tokenizer.eos_token_id] if append_eos else []))
        else:
            completion_rows.append([int(t) for t in completion])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max((len(row) for row in completion_rows), default=0)
    completion_ids = _pad_right(completion_rows, width, pad)
    mask = _pad_right([[1] * len(row) for row in completion_rows], width, 0).float()
    logp, ref_logp, token_kl = (torch.zeros(mask.shape, dtype=torch.float32) for _ in range(3))

    device = _model_device(model)
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        for start in range(0, len(completion_rows), batch_size):
            stop = min(start + batch_size, len(completion_rows))
            rows = prompt_rows[start:stop]
            prompt_width = max(len(row) for row in rows)
            prompt_ids = torch.tensor([[pad] * (prompt_width - len(row)) + row for row in rows], dtype=torch.long)
            prompt_mask = torch.tensor([[0] * (prompt_width - len(row)) + [1] * len(row) for row in rows])
            num_completion = max(max(len(row) for row in completion_rows[start:stop]), 1)
            batch_ids = completion_ids[start:stop, :num_completion]
            batch_mask = mask[start:stop, :num_completion]
            if batch_ids.size(1) < num_completion:  # every completion of the batch is empty
                batch_ids = torch.full((stop - start, 1), pad, dtype=torch.long)
                batch_mask = torch.zeros(stop - start, 1)
            input_ids = torch.cat([prompt_ids, batch_ids], dim=1).to(device)
            attention_mask = torch.cat([prompt_mask.long(), batch_mask.long()], dim=1).to(device)
            valid = batch_mask.bool().to(device)

            policy = scoring.completion_hidden_states(model, policy_settings, input_ids, attention_mask, valid)
            ref = scoring.completion_hidden_states(reference, ref_settings, input_ids, attention_mask, valid)
            scores = scoring.policy_reference_scores(
                policy.hidden,
                scoring.output_head(model),
                policy_settings,
                ref.hidden,
                scoring.output_head(reference),
                ref_settings,
                batch_ids.to(device)[valid],
                chunk_size=kl_chunk_size,
            )
            computed = (scores.log_probs, scores.ref_log_probs, scores.kl)
            for target, values in zip((logp, ref_logp, token_kl), computed, strict=True):
                per_position = torch.zeros(valid.shape, dtype=torch.float32)
                per_position.masked_scatter_(valid.cpu(), values.float().cpu())
                target[start:stop, : per_position.size(1)] = per_position[:, : target.size(1)]
    finally:
        model.train(modes[0])
        reference.train(modes[1])

    token_texts = TokenTextCache(tokenizer)
    step_ends = step_boundaries(completion_ids, mask, token_texts, step_delimiter)
    tokens = [token_texts(row) for row in completion_rows]
    return CreditScores(prompt_texts, completion_ids, mask, logp, ref_logp, token_kl, step_ends, tokens)


def readout_token_values(scores: CreditScores, readout: Readout = "centred") -> torch.Tensor:
    """Per-token values `(B, C)` float32 of one readout: `"log_ratio"`
    ([`token_log_ratios`][gnivo_trl.credit.token_log_ratios]), `"centred"`
    ([`centred_token_rewards`][gnivo_trl.credit.centred_token_rewards]) or `"log_prob"` (the policy's own
    log-probability, a likelihood
    baseline rather than an implied reward)."""
    if readout == "log_ratio":
        return token_log_ratios(scores.logp, scores.ref_logp, scores.mask)
    if readout == "centred":
        return centred_token_rewards(scores.logp, scores.ref_logp, scores.token_kl, scores.mask)
    if readout == "log_prob":
        return torch.where(scores.mask.bool(), scores.logp.float(), 0.0)
    raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}.")


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str | Sequence[dict]],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[int]]:
    """One sampled completion per prompt (`model.generate`, plain sampling: no top-k / top-p), as token ids up to
    and including the EOS token (what TRL scores), padding dropped.

    Prompts follow [`score_completions`][gnivo_trl.credit.score_completions]' convention (chat messages through the
    chat template). Seeded; the global torch RNG state and the model's training mode are restored afterwards, so
    sampling inside a training run does not perturb it. Prompts are left-padded (the tokenizer's padding side is
    restored too).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training, padding_side = model.training, tokenizer.padding_side
    rng_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    model.eval()
    tokenizer.padding_side = "left"
    rows: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [_prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = inputs.to(_model_device(model))
            output = model.generate(
                **inputs,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
            )
            for ids in output[:, inputs["input_ids"].size(1) :].tolist():
                if tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(tokenizer.eos_token_id) + 1]  # the EOS it ended with, not what follows
                elif pad != tokenizer.eos_token_id:
                    ids = [t for t in ids if t != pad]
                rows.append(ids)
    finally:
        torch.set_rng_state(rng_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return rows


# --------------------------------------------------------------------------------------------------------------------
# One completion's credit, and its pictures
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CompletionCredit:
    """The credit of one completion under one readout, in plain Python values (what the pictures draw).

    Attributes:
        prompt: the prompt text (untrusted: escaped when rendered).
        tokens: decoded text of each completion token (untrusted).
        token_values: each token's implied reward (nats).
        step_of_token: the 0-based step of each token.
        step_totals: each step's summed credit (nats).
        value_curve: the implied prefix value after each step (nats).
        readout: `"log_ratio"`, `"centred"` or `"log_prob"`.
        label: a caption (e.g. which policy); untrusted.

    Examples:
        ```python
        from gnivo_trl.credit import CompletionCredit, render_html

        credit = CompletionCredit(
            prompt="3+4",
            tokens=["3", "+", "4", "=", "7"],
            token_values=[0.0, 0.0, 0.1, 0.0, -1.2],
            step_of_token=[0, 0, 0, 0, 0],
            step_totals=[-1.1],
            value_curve=[-1.1],
            readout="log_ratio",
        )
        print(credit.step_texts(), len(render_html(credit)) > 0)
        ```
    """

    prompt: str
    tokens: list[str]
    token_values: list[float]
    step_of_token: list[int]
    step_totals: list[float]
    value_curve: list[float]
    readout: str
    label: str = ""

    def step_texts(self) -> list[str]:
        """The text of each step (its tokens joined)."""
        texts = [""] * len(self.step_totals)
        for text, step in zip(self.tokens, self.step_of_token, strict=True):
            texts[step] += text
        return texts


def completion_credit(
    scores: CreditScores, row: int, readout: Readout = "centred", label: str = ""
) -> CompletionCredit:
    """Row `row` of `scores` under `readout`, as a [`CompletionCredit`][gnivo_trl.credit.CompletionCredit]."""
    values = readout_token_values(scores, readout)[row : row + 1]
    mask = scores.mask[row : row + 1]
    ends = scores.step_ends[row : row + 1]
    credit = step_credit(values, mask, ends)
    valid = mask[0].bool()
    steps = int(credit.num_steps[0])
    return CompletionCredit(
        prompt=scores.prompts[row],
        tokens=list(scores.tokens[row]),
        token_values=values[0][valid].tolist(),
        step_of_token=token_step_index(mask, ends)[0][valid].tolist(),
        step_totals=credit.step_totals[0, :steps].tolist(),
        value_curve=credit.value_curve[0, :steps].tolist(),
        readout=readout,
        label=label,
    )


def _shade(value: float, scale: float) -> str:
    """White at 0, red for negative, green for positive, saturating at `|value| = scale`."""
    strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    faded = round(255 * (1 - 0.75 * strength))
    return f"rgb(255,{faded},{faded})" if value < 0 else f"rgb({faded},255,{faded})"


def _visible(text: str) -> str:
    """Token text as shown in a box: newlines as a return symbol (each step is its own line already)."""
    return text.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u21e5")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.example { margin-bottom: 2em; }
.prompt, .tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.prompt { background: #f4f4f4; padding: 0.4em; border-radius: 4px; }
.step { border: 1.5px solid #888; border-radius: 4px; margin: 0.3em 0; padding: 0.2em 0.4em; display: flex; }
.step.low { border-color: #c00; border-width: 2.5px; }
.total { font-family: ui-monospace, monospace; min-width: 13em; color: #444; }
.tok { padding: 0 1px; border-radius: 2px; }
.legend span { display: inline-block; width: 5.5em; text-align: center; font-size: 0.85em; padding: 0.1em 0; }
"""


def render_html(examples: CompletionCredit | Sequence[CompletionCredit], title: str = "Implied credit") -> str:
    """A self-contained HTML page: each token shaded by its implied reward, each step boxed with its total.

    Red is negative, green positive, white zero; the colour saturates at the largest `|token value|` of each
    example (the legend gives the scale). The step with the lowest total is drawn with a red border. Every piece of
    model or user text (prompt, tokens, labels, title) goes through `html.escape(..., quote=True)`: completions are
    untrusted and must not inject markup or break out of the `title` attributes.
    """
    examples = [examples] if isinstance(examples, CompletionCredit) else list(examples)
    escape = lambda text: html.escape(str(text), quote=True)  # noqa: E731
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    for example in examples:
        scale = max((abs(v) for v in example.token_values), default=0.0)
        lowest = min(range(len(example.step_totals)), key=example.step_totals.__getitem__, default=-1)
        parts += [
            '<div class="example">',
            f"<h2>{escape(example.label) + ' &mdash; ' if example.label else ''}"
            f"{escape(READOUT_NAMES.get(example.readout, example.readout))}</h2>",
            f'<div class="prompt">{escape(example.prompt)}</div>',
            '<div class="legend">per-token implied reward (nats): '
            + "".join(
                f'<span style="background:{_shade(fraction * scale, scale)}">{fraction * scale:+.3g}</span>'
                for fraction in (-1.0, -0.5, 0.0, 0.5, 1.0)
            )
            + f" &nbsp; total {sum(example.step_totals):+.3f}; red box: the lowest step</div>",
        ]
        for step, total in enumerate(example.step_totals):
            spans = "".join(
                f'<span class="tok" style="background:{_shade(value, scale)}" '
                f'title="{escape(repr(text))}: {value:+.4f}">{escape(_visible(text))}</span>'
                for text, value, token_step in zip(
                    example.tokens, example.token_values, example.step_of_token, strict=True
                )
                if token_step == step
            )
            css = "step low" if step == lowest and len(example.step_totals) > 1 else "step"
            parts.append(
                f'<div class="{css}"><span class="total">step {step + 1}: {total:+.3f} '
                f"(value {example.value_curve[step]:+.3f})</span>"
                f'<span class="tokens">{spans}</span></div>'
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _plain_label(text: str, width: int = 14) -> str:
    """A step's text as a matplotlib tick label: one line, shortened, `$` escaped (no mathtext from model text)."""
    text = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))  # no glyph for control bytes
    text = text if len(text) <= width else text[: width - 1] + "\u2026"
    return text.replace("$", r"\$")


def render_png(
    examples: CompletionCredit | Sequence[CompletionCredit], path: str | os.PathLike, title: str = "Implied credit"
) -> None:
    """Per-step credit bars and the implied value curve of each example (one row each), saved as a PNG.

    Left: each step's total (red below zero, green above) with the step's text under its bar. Right: the implied
    prefix value, per token (thin line) and at each step end (dots). Uses matplotlib's Agg backend (no display).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = [examples] if isinstance(examples, CompletionCredit) else list(examples)
    fig, axes = plt.subplots(len(examples), 2, figsize=(12, 3.2 * len(examples)), squeeze=False)
    for (bars, curve), example in zip(axes, examples, strict=True):
        steps = range(1, len(example.step_totals) + 1)
        bars.bar(steps, example.step_totals, color=["#c33" if v < 0 else "#3a3" for v in example.step_totals])
        bars.axhline(0, color="black", linewidth=0.8)
        bars.set_xticks(list(steps), [_plain_label(t) for t in example.step_texts()], fontsize=8)
        bars.set_ylabel("step credit (nats)")
        name = {"log_ratio": "log-ratio", "centred": "log-ratio - KL", "log_prob": "log-prob"}
        bars.set_title(_plain_label(f"{example.label} {name.get(example.readout, '')}".strip(), 80), fontsize=10)
        running = torch.tensor(example.token_values, dtype=torch.float32).cumsum(0).tolist()
        curve.plot(range(1, len(running) + 1), running, color="#555", linewidth=1, label="per token")
        step_end = [max(i for i, s in enumerate(example.step_of_token) if s == k) + 1 for k in range(len(steps))]
        curve.plot(step_end, example.value_curve, "o", color="#1f5fa8", label="after each step")
        curve.axhline(0, color="black", linewidth=0.8)
        curve.set_xlabel("completion token")
        curve.set_ylabel("implied value (nats)")
        curve.legend(fontsize=8)
    fig.suptitle(_plain_label(title, 120))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class CreditCallback(TrainerCallback):
    """Every `every` optimizer steps, render the implied credit of a few freshly sampled completions to
    `<output_dir>/credit/step-<N>.html` and `.png` (and the picture at the start of training).

    The policy is the trainer's model (under PEFT its base model with the adapter active). The reference is
    `reference` (a prepared causal LM, see [`prepare_for_scoring`][gnivo_trl.credit.prepare_for_scoring]) or, when
    None, a frozen copy of the policy as it is when training begins: the initial model for a fresh run, but the
    checkpoint's policy when training resumes from a checkpoint (a warning says so; pass the initial model as
    `reference` to score against it). The copy costs one model's memory on the main process only (the other processes
    neither render nor copy) and is used for scoring only. Sampling
    restores the RNG state and the training mode ([`sample_completions`][gnivo_trl.credit.sample_completions]), so
    the run is unchanged, and the trainer's model is never patched again (it already carries TRL's fused head, also
    under mixed precision). Runs on the main process only, on a model it holds whole: DeepSpeed ZeRO-3 and FSDP,
    which shard it over processes, are refused with an error when the trainer is built (or when training starts,
    for a callback added later), since sampling on one rank would hang the others.

    Args:
        tokenizer (PreTrainedTokenizerBase): the policy's tokenizer.
        prompts: a few prompts (chat messages or text), one completion each.
        every: optimizer steps between renders.
        reference: the reference model; None copies the policy at the start of training.
        readout: `"centred"` (log-ratio minus KL) or `"log_ratio"`.
        max_new_tokens: sampling length limit.
        step_delimiter: what ends a step.
        seed: sampling seed (the same at every render, so the pictures differ by the policy only).

    Examples:
        ```python
        from gnivo_trl.credit import CreditCallback
        from gnivo_trl.testing import build_tiny_tokenizer

        callback = CreditCallback(build_tiny_tokenizer(), prompts=["3+4*2-5"], every=50)
        # GNIVOTrainer(..., callbacks=[callback]) then writes
        # <output_dir>/credit/step-<N>.html and .png
        ```
    """

    def __init__(
        self,
        tokenizer,
        prompts: Sequence[str | Sequence[dict]],
        every: int = 100,
        reference: torch.nn.Module | None = None,
        readout: Readout = "centred",
        max_new_tokens: int = 256,
        step_delimiter: str = "\n\n",
        seed: int = 0,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.every = every
        self.reference = reference
        self.readout = readout
        self.max_new_tokens = max_new_tokens
        self.step_delimiter = step_delimiter
        self.seed = seed
        self.written: list[Path] = []

    @staticmethod
    def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
        """The causal LM that carries TRL's fused head: inside a DDP wrapper, and a PEFT model's base model."""
        model = getattr(model, "module", model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @staticmethod
    def _refuse_sharded_models(args) -> None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        plugin = getattr(args, "deepspeed_plugin", None)
        if is_deepspeed_zero3_enabled() or (plugin is not None and plugin.zero_stage == 3):
            sharding = "DeepSpeed ZeRO-3"
        elif getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
            sharding = "FSDP"
        else:
            return
        raise ValueError(
            f"CreditCallback does not support {sharding}: it samples and scores on the main process alone, with the "
            "whole model, while the other processes hold shards of it and would wait forever in the collectives "
            "the sampling issues. Use it with ZeRO-2, DDP or one process, or render the credit of saved checkpoints "
            "afterwards with `python -m gnivo_trl.credit --model CHECKPOINT --reference BASE ...`."
        )

    def on_init_end(self, args, state, control, **kwargs):
        self._refuse_sharded_models(args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._refuse_sharded_models(args)
        temperature = getattr(args, "temperature", 1.0)
        policy = prepare_for_scoring(self._causal_lm(model), temperature)
        if not state.is_world_process_zero:
            return  # only the main process renders, so only it holds a copy (sampling there issues no collective)
        if self.reference is None:
            if state.global_step > 0:
                logger.warning(
                    "CreditCallback: training resumes at step %d and no reference was given, so the credit is read "
                    "against the policy of the checkpoint, not the initial model. Pass reference=<the initial "
                    "model> to read it against the start of training.",
                    state.global_step,
                )
            # A frozen copy of the policy. Its TRL forward patch still closes over the policy's original
            # forward, which only the plain (non-fused) path calls: the copy is never used to generate.
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        prepare_for_scoring(self.reference, temperature)
        self._render(args, state.global_step, policy)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.is_world_process_zero:
            self._render(args, state.global_step, self._causal_lm(model))

    def _render(self, args, step: int, policy: torch.nn.Module) -> None:
        temperature = getattr(args, "temperature", 1.0)
        completions = sample_completions(
            policy,
            self.tokenizer,
            self.prompts,
            temperature=temperature,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )
        scores = score_completions(
            policy, self.reference, self.tokenizer, self.prompts, completions, step_delimiter=self.step_delimiter
        )
        examples = [
            completion_credit(scores, row, self.readout, label=f"step {step}, completion {row + 1}")
            for row in range(len(completions))
        ]
        directory = Path(args.output_dir) / "credit"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step-{step:06d}"
        title = f"Implied credit at optimizer step {step}"
        path.with_suffix(".html").write_text(render_html(examples, title), encoding="utf-8")
        render_png(examples, path.with_suffix(".png"), title)
        self.written.append(path)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gnivo_trl.credit",
        description="Render the per-token and per-step implied credit of a completion (credit.html, credit.png).",
    )
    parser.add_argument("--model", required=True, help="the policy: a directory (or name) from_pretrained can load")
    parser.add_argument("--reference", required=True, help="the reference (e.g. the model training started from)")
    parser.add_argument("--prompt", required=True, help="the user message (chat template applied unless --raw-prompt)")
    parser.add_argument("--completion", default=None, help="the completion to score; sampled from --model if absent")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--raw-prompt", action="store_true", help="use --prompt as text, without the chat template")
    parser.add_argument("--temperature", type=float, default=1.0, help="training (and sampling) temperature")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--step-delimiter", default="\n\n", help=r"what ends a step (default: a blank line, \n\n)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line; returns what it wrote to `credit.json`."""
    args = _parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = prepare_for_scoring(AutoModelForCausalLM.from_pretrained(args.model).to(device), args.temperature)
    reference = prepare_for_scoring(AutoModelForCausalLM.from_pretrained(args.reference).to(device), args.temperature)
    use_template = not args.raw_prompt and getattr(tokenizer, "chat_template", None)
    prompt = [{"role": "user", "content": args.prompt}] if use_template else args.prompt
    completion: str | list[int] = args.completion
    if completion is None:
        completion = sample_completions(
            policy,
            tokenizer,
            [prompt],
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )[0]
    scores = score_completions(
        policy, reference, tokenizer, [prompt], [completion], step_delimiter=args.step_delimiter
    )
    examples = [
        completion_credit(scores, 0, readout, label=Path(args.model).name) for readout in ("log_ratio", "centred")
    ]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    title = f"Implied credit of {Path(args.model).name} against {Path(args.reference).name}"
    (output / "credit.html").write_text(render_html(examples, title), encoding="utf-8")
    render_png(examples, output / "credit.png", title)
    record = {
        "model": args.model,
        "reference": args.reference,
        "temperature": args.temperature,
        "completion": "".join(scores.tokens[0]),
        "examples": [asdict(example) for example in examples],
    }
    (output / "credit.json").write_text(json.dumps(record, indent=1, allow_nan=True))
    for example in examples:
        totals = ", ".join(f"{v:+.3f}" for v in example.step_totals)
        lowest = min(range(len(example.step_totals)), key=example.step_totals.__getitem__) + 1
        print(f"{example.readout:>9}: step credits [{totals}]; lowest: step {lowest}")
    print(f"Wrote {output / 'credit.html'} and {output / 'credit.png'}")
    return record


if __name__ == "__main__":
    main()
