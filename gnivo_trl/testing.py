"""Offline tiny models and tokenizers for tests, examples and demos: nothing here touches the network.

A tokenizer is trained in process (byte-level BPE, so any text round-trips) and given a ChatML chat template; a tiny
Qwen2-architecture causal LM is built from a config with random weights. `save_tiny_model` writes both to a
directory, because TRL builds the reference model (`beta > 0`, VIMPO) and vLLM loads the policy from the model's
`name_or_path`: pass that directory as `model=` to a trainer. `save_tiny_tool_model` does the same with
TRL's Qwen3 chat template, whose tool calls TRL can parse, for `tools=` and `environment_factory=`.

Examples:
    ```python
    from gnivo_trl import GNIVOConfig, GNIVOTrainer
    from gnivo_trl.testing import save_tiny_model, tiny_prompt_dataset

    model_dir = save_tiny_model("tiny-model")
    args = GNIVOConfig(
        output_dir="tiny-run",
        use_cpu=True,
        bf16=False,
        max_steps=1,
        max_completion_length=8,
    )
    trainer = GNIVOTrainer(
        model=model_dir,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=tiny_prompt_dataset(16),
    )
    ```
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ._trl_private import trl_private

__all__ = [
    "CHAT_TEMPLATE",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "build_tiny_tool_tokenizer",
    "chatml_tokenizer",
    "save_tiny_model",
    "save_tiny_tool_model",
    "tiny_prompt_dataset",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_DEFAULT_CORPUS = [
    "Solve the problem step by step and put the final answer in \\boxed{}.",
    "Step 1: 12 + 7 = 19\n\nStep 2: 19 * 2 = 38\n\nThe answer is \\boxed{38}.",
    "What is 3 + 4? Let us count: 3, then 4 more gives 7.\n\n\\boxed{7}",
    "count to ten: one two three four five six seven eight nine ten",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) . , ; : ? ! x y z a b c",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>",
]


def build_tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in process, with ChatML special tokens and chat template.

    `<|im_end|>` is the EOS token and `<|pad|>` the padding token; padding is on the left, as generation needs.
    """
    backend = Tokenizer(models.BPE(unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus) if corpus is not None else _DEFAULT_CORPUS, trainer=trainer)
    return chatml_tokenizer(backend)


def chatml_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers` backend that holds `SPECIAL_TOKENS` as a transformers tokenizer with the ChatML
    chat template: `<|im_end|>` is EOS, `<|pad|>` pads, padding and truncation on the left (as generation needs).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        padding_side="left",
        truncation_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _example_tool(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def build_tiny_tool_tokenizer(vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """A tiny tokenizer with TRL's copy of the Qwen3 chat template, for multi-turn training with tools.

    TRL's `tools=` / `environment_factory=` need a chat template it recognises: `add_response_schema` then sets
    the Qwen3 response parser (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), and, since that template
    is not prefix-preserving, TRL renders prompts and tool responses with its Qwen3 training template. The BPE is
    trained on a rendered tool-calling conversation as well as the default corpus, so that the tool boilerplate of
    the system prompt takes about 250 tokens instead of 500.
    """
    qwen3_chat_template = trl_private("trl.chat_template_utils", "qwen3_chat_template")

    conversation = [
        {"role": "user", "content": "What is 3 + 4?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}],
        },
        {"role": "tool", "name": "add", "content": "7"},
        {"role": "assistant", "content": "The answer is 7."},
    ]
    renderer = build_tiny_tokenizer()
    renderer.chat_template = qwen3_chat_template
    rendered = renderer.apply_chat_template(conversation, tools=[_example_tool], tokenize=False)
    tokenizer = build_tiny_tokenizer([*_DEFAULT_CORPUS, rendered], vocab_size=vocab_size)
    tokenizer.chat_template = qwen3_chat_template
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    hidden_size: int = 16,
    num_hidden_layers: int = 2,
    intermediate_size: int = 32,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2-architecture causal LM sized for CPU tests (about 10k parameters by default)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    return model


def save_tiny_model(
    directory: str | os.PathLike, seed: int = 0, corpus: Iterable[str] | None = None, **model_kwargs
) -> str:
    """Build a tiny tokenizer and model and save both to `directory`; returns the directory as a string."""
    tokenizer = build_tiny_tokenizer(corpus)
    model = build_tiny_model(tokenizer, seed=seed, **model_kwargs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_prompt_dataset(num_prompts: int = 16, conversational: bool = True):
    """A `datasets.Dataset` with a `prompt` column (chat messages or plain strings) and a `solution` column."""
    from datasets import Dataset

    questions = [f"What is {i} + {i % 5}?" for i in range(num_prompts)]
    solutions = [str(i + i % 5) for i in range(num_prompts)]
    prompts = [[{"role": "user", "content": q}] for q in questions] if conversational else questions
    return Dataset.from_dict({"prompt": prompts, "solution": solutions})


def save_tiny_tool_model(
    directory: str | os.PathLike, seed: int = 0, max_position_embeddings: int = 1024, **model_kwargs
) -> str:
    """`save_tiny_model` with `build_tiny_tool_tokenizer` (TRL's Qwen3 chat template, for `tools=` and
    `environment_factory=`) and room for the tool schema in the prompt; returns the directory as a string."""
    tokenizer = build_tiny_tool_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, max_position_embeddings=max_position_embeddings, **model_kwargs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
