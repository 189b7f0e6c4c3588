"""An offline agent task: chained arithmetic mod 10 solved by calling a calculator tool once per step.

The problems are those of `gnivo_trl.synthetic` (`3+4*2-5`: a start digit and `num_steps` operations,
evaluated left to right modulo 10, with the same disjoint train/test splits), but the model does not write the steps:
it calls the deterministic tool `calculate` once per step through TRL's tool loop (`GRPOTrainer(tools=...)`),
reads each result from the tool's response, and boxes the last one. A whole rollout, in the tokenizer's chat format
(TRL's copy of the Qwen3 chat template; `<|im_end|>` ends every assistant turn):

```text
<|im_start|>system  (the Qwen3 tool boilerplate and calculate's JSON schema)<|im_end|>
<|im_start|>user
3+4*2-5<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "calculate", "arguments": {"a": 3, "op": "+", "b": 4}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
7
</tool_response><|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "calculate", "arguments": {"a": 7, "op": "*", "b": 2}}
</tool_call><|im_end|>
...  (one call and one response per step)
<|im_start|>assistant
\\boxed{9}<|im_end|>
```

Everything after the first `<|im_start|>assistant` line is the completion: the assistant turns are the model's
tokens (`tool_mask` 1), the tool responses with their chat markup are the tool's (`tool_mask` 0).

**Reward** (`tool_chain_reward`): 1.0 only when the rollout called `calculate` exactly once per step, in
order, with the step's operands (the left operand of a step is the previous step's result, the first step's is the
start digit; operation and right operand come from the problem), and its last turn is exactly the boxed right answer
with no further call; otherwise 0.0. So a right answer guessed without the tool, reached after a wrong call, or
reached with extra calls scores 0: the reward checks the process as well as the answer, as
`gnivo_trl.synthetic.chain_reward` checks every written step.

**Tokenizer** (`build_tool_tokenizer`): the byte-level tokenizer of `gnivo_trl.synthetic.build_tokenizer`
(one token per character of the task's text) with TRL's Qwen3 chat template, so that TRL's `add_response_schema`
recognises it and parses the tool calls, plus whole tokens for the template's fixed text: the Qwen3 tags
(`<tool_call>`, `<tool_response>`, ...), the tool boilerplate of the system prompt, `calculate`'s JSON schema, and
the fixed pieces of a call. A call is then 7 tokens (`<tool_call>\\n{"name": "calculate", "arguments": {"a": `,
digit, `, "op": "`, operation, `", "b": `, digit, `}}\\n</tool_call>`), the prompt 24 tokens and a 4-step
completion 80 (36 of them the model's), so a tiny model learns the format in minutes on CPU.

**Warm start** (`build_tool_warm_start`): a tiny Qwen2 model fine-tuned with TRL's `SFTTrainer` on rollouts of
train problems laid out token for token as TRL's tool loop lays them out (`rollout_token_ids`; loss on the
assistant turns only), a share of which carry injected errors: a call with one wrong operand (the tool's answer to the
wrong call is carried on), or a stop that boxes a guessed digit without the remaining calls. It therefore calls the
tool with a slip now and then, and solves a minority of the test problems; RL has room to improve it. Cached like
`gnivo_trl.synthetic.build_warm_start`, with its accuracy measured through a multi-turn tool loop
(`evaluate_tool_accuracy`: generate a turn, parse it with TRL's parser, run the tool, append its response).

Examples:
    ```python
    from gnivo_trl import GNIVOConfig, GNIVOTrainer
    from gnivo_trl.agent_task import build_tool_warm_start, calculate, make_tool_rl_dataset, tool_chain_reward

    model_dir = build_tool_warm_start()  # 3-4 minutes on one CPU core the first time, then cached
    trainer = GNIVOTrainer(
        model=model_dir,
        reward_funcs=tool_chain_reward,
        tools=[calculate],
        args=GNIVOConfig(output_dir="agent", gnivo_prefix_unit="turn", max_completion_length=128, use_cpu=True),
        train_dataset=make_tool_rl_dataset(4096, "train"),  # prompt (chat messages), problem, answer
    )
    ```
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ._trl_private import trl_private
from .synthetic import (
    BOXED,
    OPERATIONS,
    WARM_START_MARKER,
    AccuracyCallback,
    _parse,
    apply_operation,
    build_tokenizer,
    final_answer,
    fine_tune_into_cache,
    generate_problems,
    tiny_model_of,
    warm_start_directory,
)

__all__ = [
    "CALL_PIECES",
    "QWEN3_TAGS",
    "RESPONSE_PIECES",
    "TOOL_NAME",
    "ToolAccuracyCallback",
    "ToolWarmStartConfig",
    "build_tool_tokenizer",
    "build_tool_warm_start",
    "calculate",
    "evaluate_tool_accuracy",
    "generate_tool_completions",
    "make_tool_rl_dataset",
    "make_tool_sft_dataset",
    "prompt_messages",
    "reference_calls",
    "rollout_token_ids",
    "solution_messages",
    "solved",
    "tool_chain_reward",
]

TOOL_NAME = "calculate"
# The Qwen3 tags, each one token (as in the real Qwen3 vocabulary).
QWEN3_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# The fixed pieces of a rendered call of calculate, and of a tool response, one token each (see build_tool_tokenizer).
CALL_PIECES = ['<tool_call>\n{"name": "calculate", "arguments": {"a": ', ', "op": "', '", "b": ', "}}\n</tool_call>"]
RESPONSE_PIECES = ["\n<tool_response>\n", "\n</tool_response>"]


# --------------------------------------------------------------------------------------------------------------------
# The tool, the problems' reference calls and the reward
# --------------------------------------------------------------------------------------------------------------------


def calculate(a: int, op: str, b: int) -> int:
    """Apply one arithmetic operation modulo 10.

    Args:
        a: The left operand.
        op: The operation: "+", "-" or "*".
        b: The right operand.

    Returns:
        (a op b) modulo 10.
    """
    # bool is an int in Python, but a JSON true is not an operand.
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)):
        raise TypeError(f"a and b must be integers, got a={a!r}, b={b!r}")
    if op not in OPERATIONS:
        raise ValueError(f"op must be one of {', '.join(OPERATIONS)}; got {op!r}")
    return apply_operation(a, op, b)


def reference_calls(problem: str) -> list[tuple[int, str, int]]:
    """The `(a, op, b)` arguments of the right call at each step of `problem`: `"3+4*2"` ->
    `[(3, "+", 4), (7, "*", 2)]` (each step's left operand is the previous step's result)."""
    value, steps = _parse(problem)
    calls = []
    for operation, operand in steps:
        calls.append((value, operation, operand))
        value = apply_operation(value, operation, operand)
    return calls


def _tool_call(a: int, op: str, b: int) -> dict:
    return {"type": "function", "function": {"name": TOOL_NAME, "arguments": {"a": a, "op": op, "b": b}}}


def prompt_messages(problem: str) -> list[dict]:
    """The RL prompt of `problem`: one user message holding the problem (the tool schema comes from `tools=`)."""
    return [{"role": "user", "content": problem}]


def solution_messages(
    problem: str,
    wrong_calls: Sequence[int] = (),
    guess_at: int | None = None,
    rng: random.Random | None = None,
) -> list[dict]:
    """The completion messages of a rollout of `problem`, as TRL's tool loop returns them: per step an assistant
    message with one `calculate` call and the tool's response, then an assistant message `\\boxed{d}`.

    With `wrong_calls` (0-based steps), those calls get one wrong operand (`a` or `b`, a uniformly drawn different
    digit); the tool's answer to the wrong call is carried into the next step, as the model would carry it. With
    `guess_at`, the rollout stops calling at that step and boxes a uniformly drawn digit (the model skips the tool
    and guesses). Without either, it is the reference rollout, which `tool_chain_reward` scores 1.0.
    """
    rng = rng or random.Random(0)
    value, steps = _parse(problem)
    messages: list[dict] = []
    for index, (operation, operand) in enumerate(steps):
        if index == guess_at:
            value = rng.randrange(10)
            break
        a, b = value, operand
        if index in wrong_calls:  # one operand off by a uniformly drawn non-zero amount
            if rng.random() < 0.5:
                a = (a + rng.randrange(1, 10)) % 10
            else:
                b = (b + rng.randrange(1, 10)) % 10
        value = calculate(a, operation, b)
        messages.append({"role": "assistant", "content": "", "tool_calls": [_tool_call(a, operation, b)]})
        messages.append({"role": "tool", "name": TOOL_NAME, "content": str(value)})
    messages.append({"role": "assistant", "content": f"{BOXED}{value}}}"})
    return messages


def _arguments_match(call: dict, expected: tuple[int, str, int]) -> bool:
    """Whether one parsed call (`{"type": "function", "function": {"name", "arguments"}}`) is `expected`."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or function.get("name") != TOOL_NAME:
        return False
    arguments = function.get("arguments")
    if not isinstance(arguments, dict) or set(arguments) != {"a", "op", "b"}:
        return False
    a, op, b = expected
    # type() rather than ==: 3.0 or True are not the integer operands the schema asks for.
    return (
        type(arguments["a"]) is int
        and type(arguments["b"]) is int
        and (arguments["a"], arguments["op"], arguments["b"]) == (a, op, b)
    )


def solved(problem: str, completion: list[dict] | str, answer: str | None = None) -> bool:
    """Whether a rollout solves `problem` by the rule of `tool_chain_reward` (a plain string never does)."""
    if isinstance(completion, str) or (answer is not None and str(answer).strip() != final_answer(problem)):
        return False
    assistant = [m for m in completion if m.get("role") == "assistant"]
    calls = [call for m in assistant for call in (m.get("tool_calls") or [])]
    expected = reference_calls(problem)
    if len(calls) != len(expected) or not all(_arguments_match(c, e) for c, e in zip(calls, expected, strict=True)):
        return False
    last = assistant[-1] if assistant else {}
    content = str(last.get("content") or "").strip()
    return not last.get("tool_calls") and content == f"{BOXED}{final_answer(problem)}}}"


def tool_chain_reward(
    completions: list, problem: list[str], answer: list[str] | None = None, **kwargs
) -> list[float | None]:
    """Exact reward of tool-using rollouts in TRL's reward-function convention: 1.0 or 0.0 per completion.

    1.0 only when the completion called `calculate` exactly once per step of the problem, in order, with that
    step's operands (see `reference_calls`), and its last assistant turn is exactly `\\boxed{d}` with the right
    digit and no call. A right digit without the calls, after a wrong call, or with extra calls scores 0.0.

    Args:
        completions: TRL's conversational completions with tools: lists of messages (assistant turns with their
            parsed `tool_calls`, tool responses, the final assistant turn).
        problem: The `problem` column (e.g. `"3+4*2-5"`).
        answer: The `answer` column (the right final digit), cross-checked when present.
    """
    answers = answer if answer is not None else [None] * len(completions)
    return [1.0 if solved(p, c, a) else 0.0 for c, p, a in zip(completions, problem, answers, strict=True)]


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and the token layout of a rollout
# --------------------------------------------------------------------------------------------------------------------


def build_tool_tokenizer() -> PreTrainedTokenizerFast:
    """`gnivo_trl.synthetic.build_tokenizer` with TRL's Qwen3 chat template and whole tokens for its fixed text.

    One token per character of the problems and answers (digits, operations), ChatML specials (`<|im_end|>` is EOS,
    left padding), and single tokens for: the Qwen3 tags (`QWEN3_TAGS`), the system prompt's tool boilerplate
    before and after the schema, `calculate`'s JSON schema as the template renders it, the fixed pieces of a call
    (`CALL_PIECES`) and of a tool response (`RESPONSE_PIECES`). The system prompt is then 8 tokens instead
    of about 840, a call 7. Added tokens match longest first, and the decoder gives every text back unchanged.
    """
    tokenizer = build_tokenizer()
    tokenizer.chat_template = trl_private("trl.chat_template_utils", "qwen3_chat_template")
    rendered = tokenizer.apply_chat_template(prompt_messages("0+0"), tools=[calculate], tokenize=False)
    system = rendered[len("<|im_start|>system\n") : rendered.index("<|im_end|>")]
    # header "...<tools>", "\n", the schema (one JSON line per tool), footer "\n</tools>...</tool_call>"
    schema_start, schema_end = system.index("<tools>\n") + len("<tools>\n"), system.index("\n</tools>")
    tokenizer.add_tokens(
        [
            *QWEN3_TAGS,
            system[: schema_start - 1],
            system[schema_start:schema_end],
            system[schema_end:],
            *CALL_PIECES,
            *RESPONSE_PIECES,
        ]
    )
    # transformers (>= 5.25) parses a response from its token ids, and a tag such as <tool_call> delimits a call only
    # inside a control token. Without this list it infers the control tokens from the template's literal text, which
    # holds the bare tags but not the larger tokens above that contain them (a call's pieces), so a generated call
    # would be read as plain text. Declared as transformers documents (`chat_control_tokens`; saved with the tokenizer).
    tokenizer.chat_control_tokens = [*QWEN3_TAGS, *CALL_PIECES, *RESPONSE_PIECES]
    return tokenizer


@lru_cache(maxsize=4096)
def _turn_ids_cached(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _assistant_turn_text(tokenizer: PreTrainedTokenizerBase, message: dict) -> str:
    """What the model writes for `message`: its rendering by the chat template without the
    `<|im_start|>assistant\\n` header (the generation prompt) and without the newline after `<|im_end|>`."""
    rendered = tokenizer.apply_chat_template([message], tokenize=False)
    header = "<|im_start|>assistant\n"
    if not rendered.startswith(header):
        raise ValueError(f"Unexpected rendering of an assistant message: {rendered!r}")
    return rendered[len(header) :].removesuffix("\n")


@lru_cache(maxsize=64)
def _training_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    from trl import get_training_chat_template

    return get_training_chat_template(tokenizer)


def _tool_response_ids(tokenizer: PreTrainedTokenizerBase, tool_messages: Sequence[dict]) -> list[int]:
    """The tokens TRL appends after an assistant turn for its `tool_messages` (`GRPOTrainer._get_tool_suffix_ids`):
    the chat markup of the responses and the next generation prompt, rendered with TRL's training template (the
    prefix-preserving variant it uses because Qwen3's own template is not)."""
    key = tuple((m["name"], str(m["content"])) for m in tool_messages)
    return list(_tool_response_ids_cached(tokenizer, key))


@lru_cache(maxsize=4096)
def _tool_response_ids_cached(tokenizer: PreTrainedTokenizerBase, key: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
    messages = [{"role": "tool", "name": name, "content": content} for name, content in key]
    dummy = [
        {"role": "user", "content": "dummy"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": key[0][0], "arguments": {}}}],
        },
    ]
    template = _training_template(tokenizer)
    prefix = tokenizer.apply_chat_template(dummy, chat_template=template, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(
        dummy + messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    # The prefix ends with "<|im_end|>\n": cut it at its last EOS, as TRL does, so the newline opens the suffix.
    eos_positions = [i for i, token in enumerate(prefix) if token == tokenizer.eos_token_id]
    prefix = prefix[: eos_positions[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise ValueError("The chat template is not prefix-preserving for tool responses.")
    return tuple(full[len(prefix) :])


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: str) -> list[int]:
    return tokenizer.apply_chat_template(
        prompt_messages(problem), tools=[calculate], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def rollout_token_ids(
    tokenizer: PreTrainedTokenizerBase, problem: str, messages: Sequence[dict]
) -> tuple[list[int], list[int], list[int]]:
    """`(prompt_ids, completion_ids, tool_mask)` of a rollout, laid out token for token as TRL's tool loop does.

    `prompt_ids`: the chat template with the tool schema and the generation prompt. `completion_ids`: each assistant
    message as the model writes it (ending with `<|im_end|>`), each run of tool messages as TRL appends it (its chat
    markup and the next generation prompt). `tool_mask` (same length as `completion_ids`): 1 on the assistant
    tokens, 0 on the tool's. The warm start is fine-tuned on exactly these sequences (loss where `tool_mask` is 1), so
    that at RL time the model sees the layout it was trained on.
    """
    prompt = _prompt_ids(tokenizer, problem)
    completion: list[int] = []
    mask: list[int] = []
    index = 0
    while index < len(messages):
        message = messages[index]
        if message["role"] == "assistant":
            ids = _turn_ids_cached(tokenizer, _assistant_turn_text(tokenizer, message))
            completion += ids
            mask += [1] * len(ids)
            index += 1
        elif message["role"] == "tool":
            run = [message]
            while index + len(run) < len(messages) and messages[index + len(run)]["role"] == "tool":
                run.append(messages[index + len(run)])
            ids = _tool_response_ids(tokenizer, run)
            completion += ids
            mask += [0] * len(ids)
            index += len(run)
        else:
            raise ValueError(f"A completion holds assistant and tool messages, got role {message['role']!r}")
    return prompt, completion, mask


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def make_tool_rl_dataset(num_problems: int, split: str = "train", num_steps: int = 4, seed: int = 0):
    """A `datasets.Dataset` for RL with `tools=[calculate]`: `prompt` (chat messages), `problem`, `answer`."""
    from datasets import Dataset

    problems = generate_problems(num_problems, split=split, num_steps=num_steps, seed=seed)
    return Dataset.from_dict(
        {
            "prompt": [prompt_messages(p) for p in problems],
            "problem": problems,
            "answer": [final_answer(p) for p in problems],
        }
    )


def make_tool_sft_dataset(
    tokenizer: PreTrainedTokenizerBase,
    num_examples: int,
    num_steps: int = 4,
    error_rate: float = 0.2,
    guess_rate: float = 0.05,
    seed: int = 0,
    problem_seed: int = 2000,
):
    """Tokenized rollouts of train problems for `SFTTrainer`: `input_ids` and `assistant_masks` (1 on the
    model's tokens, 0 on the prompt and the tool's; the loss is on the 1s), plus `problem` and `messages`.

    Each step independently, in order: with probability `guess_rate` the rollout boxes a guess there and stops;
    otherwise, with probability `error_rate`, its call gets a wrong operand (see `solution_messages`). So
    about `(1 - error_rate - guess_rate) ** num_steps` of the rollouts are right (32% for the defaults).
    """
    from datasets import Dataset

    rng = random.Random(f"gnivo-trl-agent/sft-errors/{seed}")
    problems = generate_problems(num_examples, split="train", num_steps=num_steps, seed=problem_seed + seed)
    columns: dict[str, list] = {"input_ids": [], "assistant_masks": [], "problem": [], "messages": []}
    for problem in problems:
        wrong, guess_at = [], None
        for step in range(num_steps):
            draw = rng.random()
            if draw < guess_rate:
                guess_at = step
                break
            if draw < guess_rate + error_rate:
                wrong.append(step)
        messages = solution_messages(problem, wrong, guess_at, rng)
        prompt, completion, mask = rollout_token_ids(tokenizer, problem, messages)
        columns["input_ids"].append(prompt + completion)
        columns["assistant_masks"].append([0] * len(prompt) + mask)
        columns["problem"].append(problem)
        columns["messages"].append(json.dumps(messages))
    return Dataset.from_dict(columns)


# --------------------------------------------------------------------------------------------------------------------
# Multi-turn evaluation
# --------------------------------------------------------------------------------------------------------------------


def _run_tool_calls(message: dict) -> list[dict]:
    """Run the calls of an assistant `message` as TRL does: a result's `str`, or `{"error": ...}` on failure."""
    responses = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", {})
        name = function.get("name", "unknown")
        try:
            if call.get("type") != "function" or name != TOOL_NAME:
                raise ValueError(f"Tool {name} not found.")
            result = calculate(**function.get("arguments", {}))
        except Exception as error:  # noqa: BLE001  (any failure of a model's call is reported to it, as TRL does)
            result = {"error": str(error)}
        responses.append({"role": "tool", "name": name, "content": str(result)})
    return responses


@torch.no_grad()
def generate_tool_completions(
    model,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[str],
    temperature: float = 1.0,
    max_turns: int | None = None,
    max_completion_length: int = 128,
    max_turn_tokens: int = 16,
    batch_size: int = 256,
) -> list[list[dict]]:
    """One multi-turn rollout per problem, with the tool loop of TRL's `GRPOTrainer`: the completion messages.

    Each turn: sample up to `max_turn_tokens` tokens (stop at `<|im_end|>`), parse them with the tokenizer's
    response parser (`trl.chat_template_utils.parse_response`, as TRL does; `add_response_schema` is applied when
    the tokenizer has none), run the calls of a turn that has some, append the responses' tokens
    (`rollout_token_ids`' layout) and sample the next turn. A rollout ends with a turn without a call, after
    `max_turns` turns (default `num_steps + 2`), or, as in TRL, when a tool response would push the completion past
    `max_completion_length` tokens or fills it exactly (no room is left for another turn). Uses the current RNG (see
    `evaluate_tool_accuracy` for a seeded one).
    """
    from trl import add_response_schema

    parse_response = trl_private("trl.chat_template_utils", "parse_response")

    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        add_response_schema(tokenizer)
    if max_turns is None:
        max_turns = max(len(_parse(p)[1]) for p in problems) + 2
    prompts = [_prompt_ids(tokenizer, p) for p in problems]
    completions: list[list[int]] = [[] for _ in problems]
    messages: list[list[dict]] = [[] for _ in problems]
    active = list(range(len(problems)))
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    for _turn in range(max_turns):
        if not active:
            break
        next_active = []
        for start in range(0, len(active), batch_size):
            rows = active[start : start + batch_size]
            sequences = [prompts[r] + completions[r] for r in rows]
            width = max(len(s) for s in sequences)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in sequences])
            attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
            room = min(max_turn_tokens, max_completion_length - min(len(completions[r]) for r in rows))
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention.to(model.device),
                max_new_tokens=max(room, 1),
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )[:, width:].tolist()
            for row, sequence, new in zip(rows, sequences, output, strict=True):
                budget = max_completion_length - len(completions[row])
                turn = new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new
                turn = turn[:budget]
                if not turn:
                    # A tool response filled the completion to the token: TRL appends no turn and the rollout ends
                    # (and transformers parses an empty id list as an empty batch, a list, not a message).
                    continue
                parsed = parse_response(tokenizer, turn, prefix=sequence, tools=[calculate])
                completions[row] += turn
                messages[row].append(parsed)
                if not parsed.get("tool_calls"):
                    continue
                responses = _run_tool_calls(parsed)
                response_ids = _tool_response_ids(tokenizer, responses)
                if len(completions[row]) + len(response_ids) > max_completion_length:
                    continue  # TRL drops a response that would not fit, and the rollout ends
                completions[row] += response_ids
                messages[row] += responses
                next_active.append(row)
        active = next_active
    return messages


@torch.no_grad()
def evaluate_tool_accuracy(
    model,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[str],
    temperature: float = 1.0,
    seed: int = 0,
    **rollout_kwargs,
) -> float:
    """Share of `problems` whose one multi-turn rollout (`generate_tool_completions`; `rollout_kwargs` go
    there) scores 1.0 under `tool_chain_reward`.

    Seeded, so two models evaluated with the same `seed` see the same random stream; the model's training mode and
    the global torch RNG state are restored afterwards (evaluation inside a training run must not perturb it).
    """
    was_training = model.training
    model.eval()
    rng_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        completions = generate_tool_completions(model, tokenizer, problems, temperature=temperature, **rollout_kwargs)
    finally:
        torch.set_rng_state(rng_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        model.train(was_training)
    return sum(tool_chain_reward(completions, problem=list(problems))) / len(problems)


class ToolAccuracyCallback(AccuracyCallback):
    """`gnivo_trl.synthetic.AccuracyCallback` measuring `evaluate_tool_accuracy` (multi-turn, with the
    tool) instead of single-turn accuracy: `history` of `(step, accuracy)`, same seed at every evaluation."""

    def _evaluate(self, step: int, model) -> None:
        started = time.perf_counter()
        accuracy = evaluate_tool_accuracy(model, self.tokenizer, self.problems, seed=self.seed)
        self.eval_seconds += time.perf_counter() - started
        self.history.append((step, accuracy))
        if self.verbose:
            print(f"  {self.label}step {step:>4}: test accuracy {accuracy:.3f}", flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Warm start
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolWarmStartConfig:
    """Everything that determines the tool-calling warm start; the cache directory's name is a hash of it.

    The defaults fine-tune a ~0.1M-parameter Qwen2 model (hidden 64, 2 layers) on 16,000 noisy rollouts of 4-step
    problems for 4 epochs of 32 (2,000 steps, about 3.5 minutes on one busy CPU core). A third of the rollouts it
    learns from are right ((1 - 0.2 - 0.05) ** 4 = 32%), and slightly fewer of its own: 28% of the 256 test problems
    (one rollout each at temperature 1, recorded in `warm_start.json`), so RL has room to improve. (At 64 per step
    the same model learned to find the step's operation in the problem much later: smaller, more steps.)
    """

    num_steps: int = 4
    error_rate: float = 0.2
    guess_rate: float = 0.05
    num_examples: int = 16_000
    epochs: float = 4.0
    batch_size: int = 32
    learning_rate: float = 3e-3
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    eval_problems: int = 256
    seed: int = 0
    version: int = 2  # bump when the task or the recipe changes, so stale caches are not reused (2: control tokens)

    def key(self) -> str:
        """A short stable hash of every field, used as the cache directory name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_tool_warm_start(
    config: ToolWarmStartConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    verbose: bool = True,
) -> str:
    """The directory of the tool-calling warm start (tokenizer included), fine-tuning it first if it is not cached.

    Written to `cache_dir / f"tool-warm-start-{config.key()}"` (default cache dir:
    `gnivo_trl.synthetic.default_cache_dir`) through a `.tmp` directory renamed when done; a finished build
    leaves `warm_start.json` (config, seconds, multi-turn test accuracy), so an interrupted one is redone. Seeded:
    deterministic given the config on a given device.
    """
    config = config or ToolWarmStartConfig()
    directory = warm_start_directory("tool-warm-start", config, cache_dir)
    if (directory / WARM_START_MARKER).exists() and not force:
        return str(directory)

    tokenizer = build_tool_tokenizer()
    model = tiny_model_of(config, tokenizer, max_position_embeddings=256)
    dataset = make_tool_sft_dataset(
        tokenizer,
        config.num_examples,
        num_steps=config.num_steps,
        error_rate=config.error_rate,
        guess_rate=config.guess_rate,
        seed=config.seed,
    ).select_columns(["input_ids", "assistant_masks"])

    def check(model, tokenizer) -> dict:
        test_problems = generate_problems(config.eval_problems, "test", config.num_steps, seed=1)
        return {
            "test_problems": len(test_problems),
            "test_accuracy_t1": evaluate_tool_accuracy(model, tokenizer, test_problems),
        }

    info = fine_tune_into_cache(
        directory,
        model,
        tokenizer,
        dataset,
        config,
        max_length=256,
        label="tool-calling warm start",
        check=check,
        verbose=verbose,
    )
    if verbose:
        print(
            f"Tool warm start ready in {info['seconds']:.0f} s: solves {info['test_accuracy_t1']:.0%} of "
            f"{info['test_problems']} test problems (one multi-turn rollout each at temperature 1).",
            flush=True,
        )
    return str(directory)
