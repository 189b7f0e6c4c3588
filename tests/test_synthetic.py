"""The synthetic chained-arithmetic task: exact verifier, disjoint deterministic splits, tokenizer, warm start + RL."""

import json
import random

import pytest

from gnivo_trl.synthetic import (
    WarmStartConfig,
    apply_operation,
    build_tokenizer,
    build_warm_start,
    chain_reward,
    earliest_wrong_step,
    evaluate_accuracy,
    final_answer,
    generate_problems,
    is_test_problem,
    make_rl_dataset,
    make_sft_dataset,
    solution_text,
    verify,
)


def test_solution_worked_example():
    assert solution_text("3+4*2-5") == "3+4=7\n\n7*2=4\n\n4-5=9\n\n\\boxed{9}"
    assert final_answer("3+4*2-5") == "9"
    assert [apply_operation(7, op, 8) for op in "+-*"] == [5, 9, 6]


def test_right_answers_score_one_plain_and_conversational():
    problems = generate_problems(20, "train", num_steps=4, seed=3)
    solutions = [solution_text(p) for p in problems]
    answers = [final_answer(p) for p in problems]
    assert chain_reward(solutions, problem=problems, answer=answers) == [1.0] * 20
    conversational = [[{"role": "assistant", "content": s}] for s in solutions]
    assert chain_reward(conversational, problem=problems, answer=answers) == [1.0] * 20
    # Surrounding whitespace (e.g. a trailing newline before EOS) is not an error; without the answer column too.
    assert chain_reward(["\n" + solutions[0] + "\n"], problem=problems[:1]) == [1.0]


def test_every_corrupted_step_or_answer_scores_zero():
    problem = "3+4*2-5"
    reference = solution_text(problem)
    lines = reference.split("\n\n")
    corrupted = []
    for index, line in enumerate(lines[:-1]):
        result = int(line[-1])
        wrong = lines.copy()
        wrong[index] = line[:-1] + str((result + 1) % 10)  # a wrong step result, later steps unchanged
        corrupted.append("\n\n".join(wrong))
    corrupted.append(reference.replace("\\boxed{9}", "\\boxed{8}"))  # only the final answer wrong
    corrupted.append(reference.replace("7*2", "7+2", 1))  # a wrong operation copied from the problem
    corrupted.append("\n\n".join(lines[:2] + lines[3:]))  # a missing step
    corrupted.append(reference + "\n\n1+1=2")  # text after the answer
    corrupted.append(reference.replace("\n\n", "\n"))  # steps not separated by "\n\n"
    corrupted.append(solution_text(problem, error_steps=[1], rng=random.Random(0)))  # an injected SFT-style error
    corrupted.append("\\boxed{9}")  # the right answer without the steps
    assert len(set(corrupted)) == len(corrupted) and reference not in corrupted
    assert chain_reward(corrupted, problem=[problem] * len(corrupted)) == [0.0] * len(corrupted)
    # The answer column is cross-checked: a right completion with a wrong gold answer does not pass.
    assert chain_reward([reference], problem=[problem], answer=["8"]) == [0.0]
    assert verify(problem, reference, "9")


def test_an_error_undone_later_still_scores_zero():
    # 1*5=5 then a slip to 0, and 0*... = 0 again would reach the right answer by accident: still wrong.
    problem = "1*5*0"
    slipped = "1*5=0\n\n0*0=0\n\n\\boxed{0}"
    assert final_answer(problem) == "0" and solution_text(problem) != slipped
    assert chain_reward([slipped], problem=[problem], answer=["0"]) == [0.0]


def test_earliest_wrong_step_labels_the_first_wrong_piece():
    problem = "3+4*2-5"  # 3+4=7 | 7*2=4 | 4-5=9 | \\boxed{9}
    reference = solution_text(problem)
    assert earliest_wrong_step(problem, reference) is None
    assert earliest_wrong_step(problem, "\n" + reference + "\n") is None  # verify ignores surrounding whitespace
    lines = reference.split("\n\n")
    for index in range(len(lines) - 1):
        wrong = lines.copy()
        wrong[index] = wrong[index][:-1] + str((int(wrong[index][-1]) + 1) % 10)
        assert earliest_wrong_step(problem, "\n\n".join(wrong)) == index
    # A slip carried into the following lines (as the warm start makes them) is labelled where it happened.
    assert earliest_wrong_step(problem, solution_text(problem, error_steps=[1], rng=random.Random(0))) == 1
    assert earliest_wrong_step(problem, reference.replace("{9}", "{8}")) == 3  # only the boxed answer
    assert earliest_wrong_step(problem, reference.replace("7*2", "7+2", 1)) == 1  # wrong operation
    assert earliest_wrong_step(problem, "\n\n".join(lines[:2] + lines[3:])) == 2  # a missing step
    assert earliest_wrong_step(problem, reference + "\n\n1+1=2") == 4  # a piece after the answer
    assert earliest_wrong_step(problem, "\n\n".join(lines[:2])) == 1  # stopped early: at its last piece
    assert earliest_wrong_step(problem, reference.replace("\n\n", "\n")) == 0  # one piece, not the first step
    assert earliest_wrong_step(problem, "3+4=7 \n\n" + "\n\n".join(lines[1:])) == 0  # a piece's own space
    # None exactly when the verifier accepts, on the warm start's kind of noisy solutions.
    rng = random.Random(1)
    for problem in generate_problems(200, "test", num_steps=4, seed=5):
        errors = [step for step in range(4) if rng.random() < 0.3]
        text = solution_text(problem, errors, rng)
        label = earliest_wrong_step(problem, text)
        assert (label is None) == verify(problem, text)
        # solution_text's injected error always changes the step's result (it adds 1-9 mod 10).
        assert label == (min(errors) if errors else None)


def test_splits_are_disjoint_deterministic_and_sized():
    train = generate_problems(3000, "train", num_steps=3, seed=0)
    test = generate_problems(600, "test", num_steps=3, seed=0)
    assert len(set(train)) == 3000 and len(set(test)) == 600
    assert not set(train) & set(test)
    assert not any(is_test_problem(p) for p in train) and all(is_test_problem(p) for p in test)
    assert all(len(p) == 7 for p in train + test)  # start digit + 3 (operation, operand) pairs
    # Another seed draws other problems, but never crosses the split.
    other = generate_problems(3000, "train", num_steps=3, seed=1)
    assert other != train and not set(other) & set(test)
    assert generate_problems(3000, "train", num_steps=3, seed=0) == train
    assert generate_problems(100, "train", num_steps=3, seed=0) == train[:100]
    # About a fifth of all problems are test problems.
    assert 0.15 < sum(is_test_problem(p) for p in train[:1000] + other[:1000] + test) / 2600 < 0.45


def test_difficulty_knob_and_bad_arguments():
    assert all(len(p) == 13 for p in generate_problems(10, "train", num_steps=6))
    assert solution_text(generate_problems(1, "test", num_steps=6)[0]).count("\n\n") == 6
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, "validation")
    with pytest.raises(ValueError, match="num_steps"):
        generate_problems(1, "train", num_steps=0)
    with pytest.raises(ValueError, match="at most"):
        generate_problems(1000, "test", num_steps=1)
    with pytest.raises(ValueError, match="chained-arithmetic"):
        solution_text("3/4")


def test_datasets_have_the_reward_columns():
    rl = make_rl_dataset(8, "test", num_steps=4, seed=0)
    assert rl.column_names == ["prompt", "problem", "answer"]
    assert rl[0]["prompt"] == [{"role": "user", "content": rl[0]["problem"]}]
    assert all(is_test_problem(p) for p in rl["problem"])
    plain = make_rl_dataset(4, conversational=False)
    assert plain["prompt"] == plain["problem"]
    sft = make_sft_dataset(400, num_steps=4, error_rate=0.25, seed=0)
    wrong_steps = 0
    for prompt, completion in zip(sft["prompt"], sft["completion"], strict=True):
        problem, text = prompt[0]["content"], completion[0]["content"]
        assert not is_test_problem(problem)
        # Count the steps whose result does not follow from the line's own operands.
        for line in text.split("\n\n")[:-1]:
            wrong_steps += apply_operation(int(line[0]), line[1], int(line[2])) != int(line[4])
    assert 0.18 < wrong_steps / (400 * 4) < 0.32


def test_tokenizer_round_trips_and_survives_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    from gnivo_trl.testing import build_tiny_model

    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "3+4*2-5"}], add_generation_prompt=True, tokenize=False
    ) + solution_text("3+4*2-5")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer(solution_text("3+4*2-5+1"), add_special_tokens=False)["input_ids"]) == 31  # 4 steps
    # TRL loads the tokenizer of a checkpoint with AutoTokenizer, which picks Qwen2Tokenizer for a Qwen2 config:
    # the saved tokenizer must give the same ids.
    build_tiny_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.eos_token_id == tokenizer.eos_token_id and reloaded.pad_token_id == tokenizer.pad_token_id


@pytest.mark.slow
def test_tiny_warm_start_then_one_gnivo_step(tmp_path):
    """A very short warm start (cached, deterministic) and one GN-IVO step with the exact-match reward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gnivo_trl import GNIVOConfig, GNIVOTrainer

    config = WarmStartConfig(num_examples=1280, epochs=4.0, num_steps=2, hidden_size=32, intermediate_size=64)
    model_dir = build_warm_start(config, cache_dir=tmp_path / "cache", verbose=False)
    info = json.loads((tmp_path / "cache" / f"synthetic-warm-start-{config.key()}" / "warm_start.json").read_text())
    assert info["config"]["num_examples"] == 1280 and 0.0 <= info["test_accuracy_t1_256"] <= 1.0
    assert build_warm_start(config, cache_dir=tmp_path / "cache", verbose=False) == model_dir  # cached: no rebuild
    # Eighty SFT steps already teach the format: greedy completions have the step layout and a boxed answer.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    problems = generate_problems(8, "test", num_steps=2, seed=0)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in problems
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    decoded = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert sum("\\boxed{" in text and "=" in text for text in decoded) >= 6, decoded
    assert 0.0 <= evaluate_accuracy(model, tokenizer, problems) <= 1.0

    args = GNIVOConfig(
        output_dir=str(tmp_path / "rl"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=24,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        gnivo_prefix_unit="step",
    )
    trainer = GNIVOTrainer(
        model=model_dir,
        reward_funcs=chain_reward,
        args=args,
        train_dataset=make_rl_dataset(16, "train", num_steps=2),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logged) == 1 and 0.0 <= logged[0]["reward"] <= 1.0
    assert logged[0]["gnivo/prefix_horizon"] >= 1
    moved = any(not torch.equal(before[name], p.detach()) for name, p in trainer.model.named_parameters())
    # The parameters move exactly when some group had different rewards (otherwise the gradient is zero).
    assert moved == (logged[0]["gnivo/weight_entropy"] < torch.log(torch.tensor(4.0)).item() - 1e-6)


@pytest.mark.slow
def test_warm_start_is_rebuilt_deterministically(tmp_path):
    """Two builds of the same config in different caches give bit-identical weights (seeded data, init and order)."""
    from safetensors.torch import load_file

    config = WarmStartConfig(num_examples=320, epochs=1.0, num_steps=2, hidden_size=16, intermediate_size=32)
    first = build_warm_start(config, cache_dir=tmp_path / "a", verbose=False)
    second = build_warm_start(config, cache_dir=tmp_path / "b", verbose=False)
    a, b = load_file(f"{first}/model.safetensors"), load_file(f"{second}/model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # A different seed is a different model (so the comparison above is not trivially true).
    other = build_warm_start(
        WarmStartConfig(**{**config.__dict__, "seed": 1}), cache_dir=tmp_path / "c", verbose=False
    )
    c = load_file(f"{other}/model.safetensors")
    assert any(not (a[k] == c[k]).all() for k in a)


def test_evaluation_leaves_the_training_random_stream_and_mode_alone():
    import torch

    from gnivo_trl.testing import build_tiny_model

    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=16)
    model.train()
    problems = generate_problems(8, "test", num_steps=2)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    # A random model solves nothing; what matters is the RNG and the mode around the call.
    assert evaluate_accuracy(model, tokenizer, problems, max_new_tokens=4) == 0.0
    assert torch.equal(torch.rand(3), expected) and model.training
