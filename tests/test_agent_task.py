"""The offline agent task (``gnivo_trl.agent_task``): a calculator tool TRL can call, rollouts in the Qwen3 chat format
that TRL's parser reads back, the exact reward, the cached tool-calling warm start, the multi-turn evaluation, and a
GN-IVO step with ``tools=`` whose rollouts are laid out exactly as the warm start was trained."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from transformers import AutoTokenizer

from gnivo_trl.agent_task import (
    CALL_PIECES,
    TOOL_NAME,
    ToolWarmStartConfig,
    build_tool_tokenizer,
    build_tool_warm_start,
    calculate,
    evaluate_tool_accuracy,
    generate_tool_completions,
    make_tool_rl_dataset,
    make_tool_sft_dataset,
    prompt_messages,
    reference_calls,
    rollout_token_ids,
    solution_messages,
    tool_chain_reward,
)
from gnivo_trl.synthetic import final_answer, generate_problems, is_test_problem

PROBLEM = "3+4*2-5"  # calls (3, +, 4) -> 7, (7, *, 2) -> 4, (4, -, 5) -> 9
# A few dozen SFT steps: enough to check the structure of a build, not its skill.
TINY = ToolWarmStartConfig(
    num_steps=2, num_examples=96, epochs=1.0, batch_size=16, hidden_size=16, intermediate_size=32, eval_problems=8
)


@pytest.fixture(scope="module")
def tokenizer():
    from trl.chat_template_utils import add_response_schema

    return add_response_schema(build_tool_tokenizer())


@pytest.fixture(scope="module")
def warm_start_dir(tmp_path_factory) -> str:
    return build_tool_warm_start(TINY, cache_dir=tmp_path_factory.mktemp("tool-cache"), verbose=False)


def call(a: int, op: str, b: int) -> dict:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": TOOL_NAME, "arguments": {"a": a, "op": op, "b": b}}}],
    }


def tool(content) -> dict:
    return {"role": "tool", "name": TOOL_NAME, "content": str(content)}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------------------------------
# The tool and the reward
# ---------------------------------------------------------------------------------------------------------------------


def test_tool_schema_is_built_by_transformers_and_the_tool_computes_mod_10():
    from transformers.utils import get_json_schema

    schema = get_json_schema(calculate)["function"]
    assert schema["name"] == TOOL_NAME and "modulo 10" in schema["description"]
    properties = schema["parameters"]["properties"]
    assert {name: p["type"] for name, p in properties.items()} == {"a": "integer", "op": "string", "b": "integer"}
    assert schema["parameters"]["required"] == ["a", "op", "b"]
    assert [calculate(7, op, 8) for op in "+-*"] == [5, 9, 6]
    with pytest.raises(ValueError, match="op must be one of"):
        calculate(1, "/", 2)
    with pytest.raises(TypeError):
        calculate("1", "+", 2)


def test_reference_rollout_scores_one_and_every_deviation_zero():
    assert reference_calls(PROBLEM) == [(3, "+", 4), (7, "*", 2), (4, "-", 5)]
    reference = solution_messages(PROBLEM)
    assert reference == [
        call(3, "+", 4),
        tool(7),
        call(7, "*", 2),
        tool(4),
        call(4, "-", 5),
        tool(9),
        answer(r"\boxed{9}"),
    ]
    assert tool_chain_reward([reference], problem=[PROBLEM], answer=["9"]) == [1.0]
    # What TRL's parser returns for a final turn cut before EOS or with surrounding whitespace is still right.
    assert tool_chain_reward([reference[:-1] + [answer("\\boxed{9}\n")]], problem=[PROBLEM]) == [1.0]
    wrong = [
        [call(3, "+", 5), tool(8), call(8, "*", 2), tool(6), call(6, "-", 5), tool(1), answer(r"\boxed{1}")],
        [call(3, "+", 4), tool(7), call(7, "*", 2), tool(4), call(4, "-", 5), tool(9), answer(r"\boxed{8}")],
        [answer(r"\boxed{9}")],  # the right digit guessed without the tool
        reference[:-1] + [call(9, "+", 0), tool(9), answer(r"\boxed{9}")],  # an extra call
        reference[:2] + reference[4:],  # a step skipped
        reference[:-1],  # no final answer
        reference[:-1] + [answer(r"The answer is \boxed{9}")],  # text around the box
        [call(3, "+", 1), tool(4), call(7, "*", 2), tool(4), call(4, "-", 5), tool(9), answer(r"\boxed{9}")],
        [{**call(3, "+", 4), "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {}}}]}],
        [call(3.0, "+", 4), tool(7), *reference[2:]],  # not the integer operand the schema asks for
        [{**call(3, "+", 4), "tool_calls": [{"type": "function", "function": "calculate(3, +, 4)"}]}, *reference[1:]],
        r"\boxed{9}",  # a plain-text completion has no calls
    ]
    assert tool_chain_reward(wrong, problem=[PROBLEM] * len(wrong)) == [0.0] * len(wrong)
    assert tool_chain_reward([reference], problem=[PROBLEM], answer=["8"]) == [0.0]  # the answer column is checked


def test_injected_errors_are_carried_and_score_zero():
    rng = random.Random(0)
    for problem in generate_problems(50, "train", num_steps=4, seed=5):
        for wrong_calls, guess_at in [([1], None), ([0, 3], None), ([], 2), ([], 0)]:
            messages = solution_messages(problem, wrong_calls, guess_at, rng)
            calls = [m["tool_calls"][0]["function"]["arguments"] for m in messages if m.get("tool_calls")]
            responses = [int(m["content"]) for m in messages if m["role"] == "tool"]
            assert len(calls) == (4 if guess_at is None else guess_at)
            assert responses == [calculate(**c) for c in calls]  # each response is the tool's answer to its call
            # Judged from where the rollout stands (the previous response), exactly the injected calls are wrong,
            # each in one operand.
            steps = reference_calls(problem)
            starts = [int(problem[0]), *responses]
            local = [(starts[index], op, b) for index, (_, op, b) in enumerate(steps[: len(calls)])]
            off = [sum(x != y for x, y in zip(c.values(), e, strict=True)) for c, e in zip(calls, local, strict=True)]
            assert [index for index, n in enumerate(off) if n] == wrong_calls and set(off) <= {0, 1}
            assert tool_chain_reward([messages], problem=[problem]) == [0.0]


def test_rl_dataset_has_the_reward_columns_and_stays_in_its_split():
    train = make_tool_rl_dataset(32, "train", num_steps=3, seed=1)
    test = make_tool_rl_dataset(32, "test", num_steps=3, seed=1)
    assert train.column_names == ["prompt", "problem", "answer"]
    assert (
        train[0]["prompt"]
        == prompt_messages(train[0]["problem"])
        == [{"role": "user", "content": train[0]["problem"]}]
    )
    assert train["answer"] == [final_answer(p) for p in train["problem"]]
    assert not any(map(is_test_problem, train["problem"])) and all(map(is_test_problem, test["problem"]))
    assert train["problem"] == generate_problems(32, "train", num_steps=3, seed=1)


# ---------------------------------------------------------------------------------------------------------------------
# The chat format: rendered by the Qwen3 template, parsed back by TRL
# ---------------------------------------------------------------------------------------------------------------------


def test_sft_rollouts_render_with_the_chat_template_and_trl_parses_the_calls_back(tokenizer, tmp_path):
    from trl.chat_template_utils import parse_response

    dataset = make_tool_sft_dataset(tokenizer, 40, num_steps=4, error_rate=0.3, guess_rate=0.1, seed=3)
    kinds = set()
    for row in dataset:
        messages = json.loads(row["messages"])
        prompt, completion, mask = rollout_token_ids(tokenizer, row["problem"], messages)
        assert row["input_ids"] == prompt + completion and row["assistant_masks"] == [0] * len(prompt) + mask
        assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(
            prompt_messages(row["problem"]), tools=[calculate], add_generation_prompt=True, tokenize=False
        )
        # Split the completion into runs of model tokens (assistant turns) and tool tokens; parse each turn as TRL
        # does (with the conversation so far as prefix) and compare with the message it was rendered from.
        assistant = [m for m in messages if m["role"] == "assistant"]
        turns, start = [], 0
        for index in range(1, len(mask) + 1):
            if index == len(mask) or mask[index] != mask[start]:
                if mask[start] == 1:
                    turns.append((start, index))
                start = index
        assert len(turns) == len(assistant)
        for (begin, end), message in zip(turns, assistant, strict=True):
            ids = completion[begin:end]
            assert ids[-1] == tokenizer.eos_token_id  # every assistant turn ends with <|im_end|>
            parsed = parse_response(tokenizer, ids, prefix=prompt + completion[:begin], tools=[calculate])
            assert parsed.get("tool_calls") == message.get("tool_calls")
            assert parsed["content"] == message["content"]
        responses = [m["content"] for m in messages if m["role"] == "tool"]
        assert _RESPONSE.findall(tokenizer.decode(completion)) == responses
        kinds.add(tool_chain_reward([messages], problem=[row["problem"]])[0])
        if any(len(m.get("tool_calls") or []) for m in assistant):
            kinds.add("calls")
    assert kinds == {0.0, 1.0, "calls"}  # right and wrong rollouts, with calls

    # A call is 7 tokens, and the saved tokenizer (loaded as TRL loads it) gives the same ids.
    call_ids = tokenizer(
        CALL_PIECES[0] + "3" + CALL_PIECES[1] + "+" + CALL_PIECES[2] + "4" + CALL_PIECES[3], add_special_tokens=False
    )["input_ids"]
    assert len(call_ids) == 7
    from gnivo_trl.testing import build_tiny_model

    build_tiny_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    row = dataset[0]
    assert rollout_token_ids(reloaded, row["problem"], json.loads(row["messages"])) == rollout_token_ids(
        tokenizer, row["problem"], json.loads(row["messages"])
    )
    assert reloaded.decode(row["input_ids"]) == tokenizer.decode(row["input_ids"])
    # The saved tokenizer keeps the call pieces as control tokens, so TRL's parser reads a call generated as ids back
    # as a call (transformers >= 5.25 parses ids; without the declaration the call would be plain text).
    from trl.chat_template_utils import add_response_schema

    reloaded = add_response_schema(reloaded)
    prompt = reloaded.apply_chat_template(
        prompt_messages("3+4"), tools=[calculate], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    parsed = parse_response(reloaded, call_ids + [reloaded.eos_token_id], prefix=prompt, tools=[calculate])
    assert parsed.get("tool_calls") == call(3, "+", 4)["tool_calls"]


def test_sft_error_rates_give_a_noisy_solver():
    tokenizer = build_tool_tokenizer()
    dataset = make_tool_sft_dataset(tokenizer, 400, num_steps=4, error_rate=0.15, guess_rate=0.05)
    rewards = tool_chain_reward([json.loads(m) for m in dataset["messages"]], problem=dataset["problem"])
    assert 0.32 < sum(rewards) / len(rewards) < 0.50  # (1 - 0.15 - 0.05) ** 4 = 0.41
    assert max(len(ids) for ids in dataset["input_ids"]) <= 128  # 24 prompt tokens, about 80 for 4 steps


# ---------------------------------------------------------------------------------------------------------------------
# Multi-turn evaluation, with a scripted model
# ---------------------------------------------------------------------------------------------------------------------

_PROBLEM_IN_PROMPT = re.compile(r"<\|im_start\|>user\n(\d(?:[+\-*]\d)+)<\|im_end\|>")
_RESPONSE = re.compile(r"<tool_response>\n(.*?)\n</tool_response>", re.DOTALL)


def scripted_turn(text: str, member: int) -> dict:
    """The next assistant message of a scripted agent, from the conversation so far: it calls ``calculate`` for the
    next step from the last response (member 1 adds 1 to the first right operand; member 2 guesses at once)."""
    problem = _PROBLEM_IN_PROMPT.search(text).group(1)
    responses = _RESPONSE.findall(text)
    steps = reference_calls(problem)
    if member == 2:
        return answer(r"\boxed{3}")
    if len(responses) == len(steps):
        return answer(f"\\boxed{{{responses[-1]}}}")
    _, op, b = steps[len(responses)]
    a = int(responses[-1]) if responses else int(problem[0])
    return call(a, op, (b + 1) % 10 if member == 1 and not responses else b)


def scripted_rollout(problem: str, member: int) -> list[dict]:
    """The rollout of :func:`scripted_turn`'s agent, run offline with the tool."""
    messages: list[dict] = []
    text = f"<|im_start|>user\n{problem}<|im_end|>"
    while True:
        message = scripted_turn(text, member)
        messages.append(message)
        if not message.get("tool_calls"):
            return messages
        result = calculate(**message["tool_calls"][0]["function"]["arguments"])
        messages.append(tool(result))
        text += f"<tool_response>\n{result}\n</tool_response>"


def turn_ids(tokenizer, problem: str, message: dict) -> list[int]:
    return rollout_token_ids(tokenizer, problem, [message])[1]


class ScriptedModel(torch.nn.Module):
    """A stand-in for a causal LM with ``generate``: appends :func:`scripted_turn`'s next turn (member from the row)."""

    def __init__(self, tokenizer, member_of_row):
        super().__init__()
        self.tokenizer = tokenizer
        self.member_of_row = member_of_row
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            text = self.tokenizer.decode(ids[mask.bool()])
            problem = _PROBLEM_IN_PROMPT.search(text).group(1)
            new = turn_ids(self.tokenizer, problem, scripted_turn(text, self.member_of_row(problem)))[:max_new_tokens]
            rows.append(ids.tolist() + new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_evaluation_runs_the_tool_loop_and_scores_each_rollout(tokenizer):
    problems = generate_problems(12, "test", num_steps=3, seed=2)
    members = {p: i % 3 for i, p in enumerate(problems)}  # right, wrong first operand, guess
    model = ScriptedModel(tokenizer, members.__getitem__)
    completions = generate_tool_completions(model, tokenizer, problems, batch_size=5)
    for problem, messages in zip(problems, completions, strict=True):
        assert messages == scripted_rollout(problem, members[problem])
    assert evaluate_tool_accuracy(model, tokenizer, problems, batch_size=5) == pytest.approx(4 / 12)
    # A rollout whose next tool response would not fit in max_completion_length ends there, as in TRL.
    short = generate_tool_completions(model, tokenizer, problems[:1], max_completion_length=30)
    assert [m["role"] for m in short[0]] == ["assistant", "tool", "assistant"]
    # One whose tool response fills max_completion_length to the token ends after it, with no empty turn parsed.
    first = generate_tool_completions(model, tokenizer, problems[:1])[0][:2]
    _, filled, _ = rollout_token_ids(tokenizer, problems[0], first)
    exact = generate_tool_completions(model, tokenizer, problems[:1], max_completion_length=len(filled))
    assert exact[0] == first


# ---------------------------------------------------------------------------------------------------------------------
# The cached warm start
# ---------------------------------------------------------------------------------------------------------------------


def test_warm_start_is_cached_under_a_hash_of_its_config(warm_start_dir, monkeypatch):
    from pathlib import Path

    directory = Path(warm_start_dir)
    assert directory.name == f"tool-warm-start-{TINY.key()}"
    assert not directory.with_name(directory.name + ".tmp").exists()
    info = json.loads((directory / "warm_start.json").read_text())
    assert info["config"] == TINY.__dict__ and info["test_problems"] == 8 and 0.0 <= info["test_accuracy_t1"] <= 1.0
    assert (directory / "model.safetensors").exists() and (directory / "tokenizer.json").exists()
    # A second call reuses the directory: no training.
    import trl

    monkeypatch.setattr(trl, "SFTTrainer", None)
    assert build_tool_warm_start(TINY, cache_dir=directory.parent, verbose=False) == warm_start_dir
    assert ToolWarmStartConfig(**{**TINY.__dict__, "seed": 1}).key() != TINY.key()
    # The warm start evaluates through the loop without error, and leaves the RNG stream and mode alone.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(warm_start_dir)
    model.train()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    accuracy = evaluate_tool_accuracy(model, AutoTokenizer.from_pretrained(warm_start_dir), ["3+4*2", "1-1*1"])
    assert 0.0 <= accuracy <= 1.0 and model.training and torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------------------------------
# GN-IVO with tools= on the warm start
# ---------------------------------------------------------------------------------------------------------------------


def test_gnivo_step_with_tools_lays_rollouts_out_as_the_warm_start_was_trained(warm_start_dir, tmp_path):
    """TRL's tool loop parses the scripted calls, runs ``calculate`` and appends its responses: each row's prompt and
    completion tokens are exactly :func:`rollout_token_ids` of the scripted rollout (the warm start's SFT layout), tool
    tokens have ``tool_mask`` 0, the reward is exact, and one GN-IVO step with turn units trains."""
    from gnivo_trl import GNIVOConfig, GNIVOTrainer

    k = 4
    tokenizer = AutoTokenizer.from_pretrained(warm_start_dir)
    args = GNIVOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        num_generations=k,
        per_device_train_batch_size=8,
        max_completion_length=96,
        max_steps=1,
        learning_rate=0.05,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        gnivo_prefix_unit="turn",
        max_tool_calling_iterations=TINY.num_steps + 1,
    )
    trainer = GNIVOTrainer(
        model=warm_start_dir,
        reward_funcs=tool_chain_reward,
        tools=[calculate],
        args=args,
        train_dataset=make_tool_rl_dataset(8, "train", num_steps=TINY.num_steps),
        processing_class=tokenizer,
    )

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # First turn: member m of each group follows script m % 3 (right, wrong first operand, guess, right); later
        # turns continue from the last tool response, the same for every script that called the tool.
        turns = []
        for offset, ids in enumerate(prompt_ids):
            text = tokenizer.decode(ids)
            member = offset % num_generations % 3 if num_generations > 1 else 0
            problem = _PROBLEM_IN_PROMPT.search(text).group(1)
            turns.append(turn_ids(tokenizer, problem, scripted_turn(text, member)))
        return turns, None

    trainer._generate_single_turn = generate
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    rows = [row for row in trainer.train_dataset.select(range(2)) for _ in range(k)]
    batch = trainer._generate_and_score_completions(rows)
    rewards = []
    for index, row in enumerate(rows):
        messages = scripted_rollout(row["problem"], index % k % 3)
        prompt, completion, mask = rollout_token_ids(tokenizer, row["problem"], messages)
        prompt_mask, completion_mask = batch["prompt_mask"][index].bool(), batch["completion_mask"][index].bool()
        assert batch["prompt_ids"][index][prompt_mask].tolist() == prompt
        assert batch["completion_ids"][index][completion_mask].tolist() == completion
        assert batch["tool_mask"][index][completion_mask].tolist() == mask
        rewards.append(tool_chain_reward([messages], problem=[row["problem"]])[0])
    assert rewards == [1.0, 0.0, 0.0, 1.0] * 2
    assert (batch["tool_mask"][batch["completion_mask"].bool()] == 0).any()  # tool tokens are in the batch

    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged["reward"] == pytest.approx(0.5) and logged["tools/call_frequency"] > 0
    assert logged["tools/failure_frequency"] == 0 and torch.isfinite(torch.tensor(logged["loss"]))
    assert 1.0 < logged["gnivo/prefix_horizon"] <= TINY.num_steps + 1  # one unit per assistant turn
