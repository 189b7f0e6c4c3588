"""Deterministic trainer runs for tests: stubbed generation, fixed rewards, one-step parameter updates.

Used in process by the trainer tests and, through ``python -m torch.distributed.run``, by ``distributed_layout.py``
for the two-process layouts. Generation is replaced by a stub whose completion for a row depends only on the prompt
and the row's index inside its group, so every batch layout (micro-batches, accumulation, processes) sees exactly the
same rows; with plain SGD and no gradient clipping, the parameter update of one step is ``-lr * gradient``.
"""

from __future__ import annotations  # noqa: I001

import re
import torch
from datasets import Dataset

from trl import GRPOConfig, GRPOTrainer

from gnivo_trl import GNIVOConfig, GNIVOTrainer, VIMPOConfig, VIMPOTrainer

# Completion texts of different lengths, with and without step delimiters and with different rewards.
COMPLETION_POOL = [
    "Step 1: 3 + 4 = 7\n\nStep 2: 7 * 2 = 14\n\nThe answer is 14.",
    "7",
    "Let us count: one two three.\n\n\\boxed{7}",
    "3 + 4 = 8\n\nso 8.",
    "The answer is 7.\n\nDone: 7 7",
    "Hi there.",
    "Step 1: 1 + 1 = 2\n\nStep 2: 2 + 5 = 7\n\nStep 3: \\boxed{7}",
    "nine ten",
]
# Prompts that tokenize to one length, so that no process left-pads its prompts differently from another.
PROMPTS = [f"What is {a} + {b}?" for a in range(1, 10) for b in range(1, 10)]

ALGORITHMS = {
    "gnivo": (GNIVOConfig, GNIVOTrainer),
    "vimpo": (VIMPOConfig, VIMPOTrainer),
    "grpo": (GRPOConfig, GRPOTrainer),  # the baseline, with the same stubbed generation
}


def reward_sevens(completions, **kwargs) -> list[float]:
    """A deterministic reward with several distinct values per group."""
    return [min(c[0]["content"].count("7"), 3) / 3 for c in completions]


def equal_length_dataset(tokenizer, num_prompts: int = 16) -> Dataset:
    """Conversational prompts whose templated token lengths are all equal."""
    lengths: dict[int, list[str]] = {}
    for text in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        lengths.setdefault(len(ids), []).append(text)
    texts = max(lengths.values(), key=len)[:num_prompts]
    if len(texts) < num_prompts:
        raise RuntimeError(f"Only {len(texts)} equal-length prompts available, {num_prompts} requested.")
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})


def _completion_function(trainer, long_then_short: bool = False):
    """Completion ids as a deterministic function of (prompt, index of the row inside its group).

    ``long_then_short``: rows in the first half of the global generation batch get long completions (the first pool
    entry repeated to ``max_completion_length``) and the others a single token, so that two processes holding one
    half each have very different numbers of completion tokens.
    """
    tokenizer = trainer.processing_class
    max_length = trainer.args.max_completion_length

    def completions_for(prompt_ids, num_generations, with_eos_every: int = 3):
        first_global_row = trainer.accelerator.process_index * len(prompt_ids)
        global_rows = trainer.accelerator.num_processes * len(prompt_ids)
        completions = []
        for offset, ids in enumerate(prompt_ids):
            member = (first_global_row + offset) % num_generations
            key = sum(int(t) for t in ids) * 7 + member * 3
            text = COMPLETION_POOL[key % len(COMPLETION_POOL)]
            if long_then_short:
                text = (text + " ") * max_length if first_global_row + offset < global_rows // 2 else "7"
            completion = tokenizer(text, add_special_tokens=False)["input_ids"]
            if key % with_eos_every:
                completion = completion + [tokenizer.eos_token_id]
            completions.append(completion[:max_length])
        return completions

    return completions_for


def stub_generation(trainer, long_then_short: bool = False) -> None:
    """Replace generation by a deterministic function of (prompt, index of the row inside its group)."""
    completions_for = _completion_function(trainer, long_then_short)

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return completions_for(prompt_ids, num_generations), None

    trainer._generate_single_turn = generate


def truncate_completions(trainer, rows=lambda index: True) -> None:
    """The stub's completions of the rows ``rows(index)`` selects (index within the generation call) end without EOS:
    TRL counts them as truncated, and masks them with ``mask_truncated_completions=True``."""
    generate, eos = trainer._generate_single_turn, trainer.processing_class.eos_token_id

    def generate_without_eos(*args, **kwargs):
        completions, extra = generate(*args, **kwargs)
        return [
            [token for token in completion if token != eos] if rows(index) else completion
            for index, completion in enumerate(completions)
        ], extra

    trainer._generate_single_turn = generate_without_eos


def record_scored_batches(trainer) -> list[dict]:
    """Records (copies of) every generation batch the trainer scores, in order.

    VIMPO computes the reference log-probs, KL and whitened advantages in the loss step: for it the record of a batch
    is the input of the last loss step run on it (in the one-micro-batch layout, the whole generation batch with its
    rows shuffled) together with ``vimpo_ref_logps``, ``vimpo_token_kl`` and ``vimpo_advantages``, each ``(B, C)``.
    """
    batches: list[dict] = []

    def copy(batch: dict) -> dict:
        return {
            key: value.detach().clone() if isinstance(value, torch.Tensor) else value for key, value in batch.items()
        }

    generate_and_score = trainer._generate_and_score_completions

    def record(inputs):
        output = generate_and_score(inputs)
        batches.append(copy(output))
        return output

    trainer._generate_and_score_completions = record
    if hasattr(trainer, "_token_scores"):
        token_scores, whitened_advantages = trainer._token_scores, trainer._whitened_advantages
        loss_inputs = {}

        def record_token_scores(model, inputs):
            scores = token_scores(model, inputs)
            loss_inputs.update(inputs=inputs, scores=scores)
            return scores

        def record_advantages(scores, mask, mode):
            advantages = whitened_advantages(scores, mask, mode)
            batches[-1] = copy(
                {
                    **loss_inputs["inputs"],
                    "vimpo_ref_logps": scores.ref_logp,
                    "vimpo_token_kl": scores.token_kl,
                    "vimpo_advantages": advantages,
                }
            )
            return advantages

        trainer._token_scores, trainer._whitened_advantages = record_token_scores, record_advantages
    return batches


def build_trainer(
    algorithm: str,
    model_dir: str,
    output_dir: str,
    reward=reward_sevens,
    trainer_kwargs: dict | None = None,
    train_dataset: Dataset | None = None,
    model=None,
    long_then_short: bool = False,
    **overrides,
):
    """A trainer with stubbed generation; ``overrides`` are config fields, ``trainer_kwargs`` extra trainer arguments
    (e.g. ``peft_config``), ``train_dataset`` replaces the default equal-length prompts, ``model`` (an instance, or a
    function called with the config once it exists, as a script that parses its arguments first loads the model)
    replaces loading from ``model_dir`` (whose tokenizer is still used) and ``long_then_short`` gives the first half
    of the global batch long completions and the second half one-token ones."""
    config_cls, trainer_cls = ALGORITHMS[algorithm]
    settings = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=24,
        max_steps=1,
        learning_rate=0.5,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=1e9,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    if algorithm == "vimpo":
        settings["vimpo_beta"] = 0.05  # large enough that the value and actor terms both move the parameters
        settings["vimpo_actor_coeff"] = 1.0
    settings.update(overrides)
    args = config_cls(**settings)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if callable(model) and not isinstance(model, torch.nn.Module):
        model = model(args)
    trainer = trainer_cls(
        model=model_dir if model is None else model,
        reward_funcs=reward,
        args=args,
        train_dataset=equal_length_dataset(tokenizer) if train_dataset is None else train_dataset,
        processing_class=tokenizer,
        **(trainer_kwargs or {}),
    )
    stub_generation(trainer, long_then_short)
    return trainer


def start_training(trainer) -> None:
    """What Trainer's loop sets before scoring and loss steps: training mode and the accumulation count."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps


def moved_policy_batch(trainer, scale: float = 0.3, seed: int | None = None) -> dict:
    """One training generation batch (2 prompts x 4 completions) after moving the policy off the reference by
    ``scale`` Gaussian noise (so that the KL and rho are not 0); ``seed`` seeds the noise."""
    start_training(trainer)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(scale * torch.randn_like(p))
    return trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(2)).repeat(4)))


def full_softmax_log_probs(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """float64 ``(B, C, V)`` log-softmax of a model's own ``forward().logits`` at the positions that predict the
    completion tokens of a scored batch."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    num_completion = batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -num_completion - 1 : -1].double()
    return (logits / temperature).log_softmax(-1)


def parameter_update(trainer) -> dict[str, torch.Tensor]:
    """Train (``max_steps`` optimizer steps) and return each parameter's change."""
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    return {name: (p.detach() - before[name]).double() for name, p in trainer.model.named_parameters()}


class FakeVLLMGeneration:
    """Stand-in for TRL's ``VLLMGeneration`` (no vLLM install): the stub's completions plus sampling log-probs.

    The sampling log-probs are the policy's own (temperature-scaled) log-probs of each completion token shifted by
    ``shifts[member] / length`` per token, so the sequence-level importance ratio pi_old / pi_sampler that TRL
    computes is ``exp(-shifts[member])`` for the row with index ``member`` inside its group.
    """

    def __init__(self, trainer, shifts: list[float]):
        self.trainer = trainer
        self.shifts = shifts
        self.completions_for = _completion_function(trainer)

    def sync_weights(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        trainer = self.trainer
        completions = self.completions_for(prompts, num_generations)
        first_global_row = trainer.accelerator.process_index * len(prompts)
        logprobs = []
        for offset, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            ids = torch.tensor([list(prompt) + completion])
            logits = trainer.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / trainer.temperature
            token_logps = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            shift = self.shifts[(first_global_row + offset) % num_generations] / len(completion)
            logprobs.append([[float(lp) + shift] for lp in token_logps])
        return prompts, completions, logprobs, None


def use_fake_vllm(trainer, mode: str, shifts: list[float], clip_max: float = 3.0) -> None:
    """Switch a constructed trainer to the vLLM code path with :class:`FakeVLLMGeneration`."""
    trainer.use_vllm = trainer.args.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = trainer.args.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_max = clip_max
    trainer.vllm_importance_sampling_clip_min = None
    trainer.vllm_generation = FakeVLLMGeneration(trainer, shifts)
    trainer._last_loaded_step = -1
    del trainer._generate_single_turn  # back to GRPOTrainer's own, which takes the vLLM branch


def exit_distributed_run(accelerator) -> None:
    """End a launched rank once its work is saved: destroy the process group in step, then leave the interpreter.

    Left to interpreter exit, a rank can abort in C++ teardown (gloo/c10d threads: "terminate called without an
    active exception", about once in ten runs) after its work is done, which the launcher reports as a failed rank.
    ``os._exit`` skips that teardown.
    """
    import os
    import sys

    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def save_tiny_family_model(directory, family: str) -> str:
    """A tiny model of another family than Qwen2, saved with the tiny tokenizer, for the logit-transform and MoE tests.

    ``granite``: ``logits_scaling=8`` (the logits are divided by 8); ``gemma2``: ``final_logit_softcapping=3``
    (small, so that the cap bends the random logits); ``cohere``: ``logit_scale=4``; ``mixtral``: 4 experts, 2 per
    token, ``router_aux_loss_coef=0.05``.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, MixtralConfig

    from gnivo_trl.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    configs = {
        "granite": lambda: GraniteConfig(**common, logits_scaling=8.0),
        "gemma2": lambda: Gemma2Config(**common, head_dim=4, final_logit_softcapping=3.0, query_pre_attn_scalar=4),
        "cohere": lambda: CohereConfig(**common, logit_scale=4.0),
        "mixtral": lambda: MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.05
        ),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[family]())
    with torch.no_grad():  # larger logits than the default init, so that scale and soft-cap matter
        model.get_output_embeddings().weight.mul_(20.0)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


# ---------------------------------------------------------------------------------------------------------------------
# Multi-turn rollouts with tools (TRL's tools= / environment_factory=), for gnivo_trl.testing.save_tiny_tool_model
# ---------------------------------------------------------------------------------------------------------------------

TOOL_NAME = "add_numbers"
# Final answers after the tool calls; {result} is the last tool response.
ANSWER_TEMPLATES = ["The answer is {result}.", "{result}", "I think {result} 7.", "Done: 7 7 {result}"]
_TOOL_CALL_ARGUMENTS = re.compile(r'"arguments": \{"a": (\d+), "b": (\d+)\}')
_TOOL_RESPONSE = re.compile(r"<tool_response>\n(.*?)\n</tool_response>", re.DOTALL)


def add_numbers(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def tool_call_text(a: int, b: int) -> str:
    """A well-formed Qwen3 tool call of :func:`add_numbers` (what TRL's Qwen3 response parser reads)."""
    return f'<tool_call>\n{{"name": "{TOOL_NAME}", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'


def reward_tool_use(completions, **kwargs) -> list[float]:
    """A deterministic reward of a multi-turn completion (a list of messages): sevens in the assistant turns plus
    the number of tool calls, so that rows of a group differ."""
    rewards = []
    for messages in completions:
        assistant = [m for m in messages if m["role"] == "assistant"]
        sevens = sum(str(m.get("content") or "").count("7") for m in assistant)
        calls = sum(len(m.get("tool_calls") or []) for m in assistant)
        rewards.append(min(sevens, 3) / 3 + 0.5 * calls)
    return rewards


def stub_tool_generation(trainer) -> None:
    """Replace generation by a deterministic multi-turn policy that writes Qwen3 tool calls of :func:`add_numbers`.

    First turn (``num_generations`` = K rows per prompt): the row with index ``m`` in its group answers at once when
    ``key % 4 == 0`` (``key`` a function of the prompt and ``m``), and otherwise calls ``add_numbers(a, b)`` with
    ``b`` (1 or 2) the number of calls it will make. Later turns (TRL's tool loop calls with ``num_generations=1`` on
    the conversation so far, tool responses included): another call while fewer than ``b`` tool responses are in the
    conversation, then an answer holding the last tool result. Every turn ends with EOS except some final answers.
    Each turn is a function of the token sequence so far, so every batch layout sees exactly the same rows.
    """
    tokenizer = trainer.processing_class
    eos = tokenizer.eos_token_id

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        first_global_row = trainer.accelerator.process_index * len(prompt_ids)
        completions = []
        for offset, ids in enumerate(prompt_ids):
            text = tokenizer.decode(ids, skip_special_tokens=False)
            calls = _TOOL_CALL_ARGUMENTS.findall(text)
            if num_generations > 1:  # first turn: a function of (prompt, index of the row in its group)
                member = (first_global_row + offset) % num_generations
                key = sum(int(t) for t in ids) * 7 + member * 3
                reply = None if key % 4 == 0 else tool_call_text(key % 7, 1 + key % 2)
            else:  # a turn after tool output: a function of the conversation so far
                key = sum(int(t) for t in ids)
                responses = _TOOL_RESPONSE.findall(text)
                wanted = int(calls[0][1]) if calls else 0
                reply = tool_call_text(int(responses[-1]), wanted) if len(responses) < wanted else None
            if reply is None:
                result = _TOOL_RESPONSE.findall(text)[-1] if num_generations == 1 else str(key % 10)
                reply = ANSWER_TEMPLATES[key % len(ANSWER_TEMPLATES)].format(result=result)
                with_eos = key % 3 != 0
            else:
                with_eos = True
            completion = tokenizer(reply, add_special_tokens=False)["input_ids"] + ([eos] if with_eos else [])
            completions.append(completion[: trainer.args.max_completion_length])
        return completions, None

    trainer._generate_single_turn = generate


class AdditionEnvironment:
    """A TRL environment (``environment_factory=AdditionEnvironment``): ``reset`` returns the task from the row's
    ``target`` column (the dataset needs no ``prompt``), :meth:`add_numbers` is its tool, ``get_reward`` scores the
    rollout from the environment's state."""

    def __init__(self) -> None:
        self.target = 0
        self.last_result: int | None = None
        self.calls = 0

    def reset(self, **row) -> str:
        self.target = int(row.get("target", 7))
        self.last_result = None
        self.calls = 0
        return f"Reach {self.target} by adding numbers."

    def add_numbers(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self.calls += 1
        self.last_result = a + b
        return a + b

    def get_reward(self) -> float:
        distance = abs(self.target - self.last_result) if self.last_result is not None else 10
        return 1.0 / (1 + distance) + 0.1 * self.calls
