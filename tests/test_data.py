"""Tests for :mod:`gnivo_trl.data` on the small fixtures in ``tests/fixtures/datasets`` (local files only).

The fixtures are written by ``tests/fixtures/make_fixtures.py`` in each source's real column layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gnivo_trl.data import DATASETS, INSTRUCTION, build_prompt, load_math_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"

# (registry name, fixture file, expected gold answers in order, first question's opening words)
EXPECTED = [
    ("math", "math_train.jsonl", ["12", r"\frac{\sqrt{3}}{2}", "1", r"\{2, 3\}"], "What is the value of"),
    ("hendrycks_math", "math_train.jsonl", ["12", r"\frac{\sqrt{3}}{2}", "1", r"\{2, 3\}"], "What is the value"),
    ("math500", "math500.parquet", [r"\left( 5, \frac{\pi}{2} \right)", "0.75", "(-1, 3)"], "Convert the point"),
    ("gsm8k", "gsm8k.jsonl", ["1234", "3", "48"], "A shop sells 617 pens"),
    ("aime24", "aime24.jsonl", ["024", "24", "23"], "Find the remainder"),
    ("aime25", "aime25.jsonl", ["9", "120", "10"], "Find the sum of the digits"),
    ("aime25", "aime25_opencompass.jsonl", ["9", "120", "10"], "Find the sum of the digits"),
    ("amc23", "amc23.jsonl", ["27", "3.5", "-4"], "What is $3^3$?"),
    ("minerva", "minerva.jsonl", ["10", "9", "1"], "A star has parallax"),
    ("olympiadbench", "olympiadbench.jsonl", [r"\sqrt{2}", "0, 1", "6"], "Find the largest real"),
    ("guru_math", "guru_math.parquet", ["56", r"\frac{5}{2}", "23", r"\frac{1}{2}"], "What is $7 \\times 8$?"),
]

# An equivalent answer written differently from the gold one, per (name, file, row): the loaded solution must be
# something math_accuracy_reward can grade, not just a string that matches itself.
EQUIVALENT_ANSWERS = {
    ("math", 1): r"\frac{1}{2}\sqrt{3}",
    ("math500", 1): r"\frac{3}{4}",
    ("gsm8k", 0): "1,234",
    ("aime24", 0): "24",
    ("amc23", 1): r"\frac{7}{2}",
    ("olympiadbench", 1): r"\{1, 0\}",
    ("guru_math", 1): "2.5",
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


def ids(row):
    return f"{row[0]}-{row[1]}"


@pytest.mark.parametrize(("name", "filename", "answers", "opening"), EXPECTED, ids=[ids(r) for r in EXPECTED])
def test_loader_on_fixture(name, filename, answers, opening, cache_dir):
    dataset = load_math_dataset(name, str(FIXTURES / filename), cache_dir=cache_dir)

    assert dataset.column_names == ["prompt", "solution", "source"]
    assert dataset["solution"] == answers
    for prompt in dataset["prompt"]:
        assert len(prompt) == 1
        assert prompt[0]["role"] == "user"
        assert prompt[0]["content"].endswith("\n" + INSTRUCTION)
        assert prompt[0]["content"].count("boxed") == 1, "the source's own instruction must not be kept"
    assert dataset["prompt"][0][0]["content"].startswith(opening)


@pytest.mark.parametrize(("name", "filename", "answers", "opening"), EXPECTED, ids=[ids(r) for r in EXPECTED])
def test_math_accuracy_reward_grades_loaded_solutions(name, filename, answers, opening, cache_dir):
    pytest.importorskip("math_verify")
    from gnivo_trl.rewards import math_accuracy_reward

    dataset = load_math_dataset(name, str(FIXTURES / filename), cache_dir=cache_dir)
    solutions = dataset["solution"]
    correct = [[{"role": "assistant", "content": f"Thus the answer is $\\boxed{{{s}}}$."}] for s in solutions]
    assert math_accuracy_reward(correct, solutions) == [1.0] * len(solutions)

    wrong = [[{"role": "assistant", "content": r"\boxed{123456789}"}] for _ in solutions]
    assert math_accuracy_reward(wrong, solutions) == [0.0] * len(solutions)

    for (spec_name, row), answer in EQUIVALENT_ANSWERS.items():
        if spec_name == name:
            assert math_accuracy_reward([f"\\boxed{{{answer}}}"], [solutions[row]]) == [1.0], (answer, solutions[row])


def test_math_rows_without_a_box_are_dropped_with_a_warning(cache_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="gnivo_trl.data"):
        dataset = load_math_dataset("math", str(FIXTURES / "math_train.jsonl"), cache_dir=cache_dir)
    assert len(dataset) == 4  # the fixture's fifth row (a proof) has no \boxed answer
    assert any("dropped 1 of 5 rows" in record.message for record in caplog.records)


def test_guru_question_comes_from_original_question_or_the_stripped_prompt(cache_dir):
    dataset = load_math_dataset("guru_math", str(FIXTURES / "guru_math.parquet"), cache_dir=cache_dir)
    contents = [prompt[0]["content"] for prompt in dataset["prompt"]]
    # Row 2 has no original_question: its question is the user message minus Guru's own instruction.
    assert contents[2] == "What is the smallest prime greater than $20$?\n" + INSTRUCTION
    assert contents[0] == "What is $7 \\times 8$?\n" + INSTRUCTION
    assert set(dataset["source"]) == {"math__merged_deduped_dapo_or1_dataset"}


def test_guru_compressed_variant_with_json_strings(tmp_path, cache_dir):
    row = {
        "data_source": "math__combined",
        "prompt": [{"role": "user", "content": "What is $1+1$? Please output the final answer within \\boxed{}."}],
        "ability": "math",
        "reward_model": json.dumps({"ground_truth": "2", "style": "rule"}),
        "extra_info": json.dumps({"index": 0}),
    }
    path = tmp_path / "guru_compressed.jsonl"
    path.write_text(json.dumps(row) + "\n")
    dataset = load_math_dataset("guru_math", str(path), cache_dir=cache_dir)
    assert dataset["solution"] == ["2"]
    assert dataset["prompt"][0][0]["content"] == "What is $1+1$?\n" + INSTRUCTION


def test_sources_default_to_their_name(cache_dir):
    dataset = load_math_dataset("gsm8k", str(FIXTURES / "gsm8k.jsonl"), cache_dir=cache_dir)
    assert set(dataset["source"]) == {"gsm8k"}


def test_system_prompt(cache_dir):
    dataset = load_math_dataset(
        "minerva", str(FIXTURES / "minerva.jsonl"), system_prompt="Be brief.", cache_dir=cache_dir
    )
    prompt = dataset["prompt"][0]
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert prompt[0]["content"] == "Be brief."
    assert prompt[1]["content"].endswith(INSTRUCTION)


def test_build_prompt():
    assert build_prompt("  What is 2+2?  ") == [{"role": "user", "content": "What is 2+2?\n" + INSTRUCTION}]
    assert INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."


def test_unknown_dataset_lists_the_known_names():
    with pytest.raises(KeyError) as error:
        load_math_dataset("mathh", str(FIXTURES / "math_train.jsonl"))
    message = str(error.value)
    assert "'mathh'" in message
    for name in DATASETS:
        assert name in message


def test_missing_column_names_the_column_and_the_file(tmp_path, cache_dir):
    path = tmp_path / "no_answer.jsonl"
    path.write_text(json.dumps({"problem": "What is 1+1?", "solution_text": "2"}) + "\n")
    with pytest.raises(ValueError) as error:
        load_math_dataset("math500", str(path), cache_dir=cache_dir)
    message = str(error.value)
    assert "'answer'" in message and str(path) in message

    path = tmp_path / "no_question.jsonl"
    path.write_text(json.dumps({"query": "What is 1+1?", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="'question' or 'problem'") as error:
        load_math_dataset("minerva", str(path), cache_dir=cache_dir)
    assert str(path) in str(error.value)


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_math_dataset("gsm8k", str(tmp_path / "missing.jsonl"))


def test_hub_ids_are_used_when_no_path_is_given(monkeypatch):
    """The Hub code path is real code; here ``datasets.load_dataset`` is replaced to see what it is called with."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, data_files=None, cache_dir=None):
        calls.append((path, name, split, data_files))
        return datasets.Dataset.from_list([{"problem": "What is 1+1?", "solution": r"So \boxed{2}.", "level": "1"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_math_dataset("hendrycks_math")
    assert len(calls) == 7 and {c[0] for c in calls} == {"EleutherAI/hendrycks_math"}
    assert calls[0][1:] == ("algebra", "train", None)
    assert dataset["solution"] == ["2"] * 7

    calls.clear()
    load_math_dataset("math", split="test")
    assert calls == [("DigitalLearningGmbH/MATH-lighteval", "default", "test", None)]

    calls.clear()
    with pytest.raises(ValueError, match="Hub dataset LLM360/guru-RL-92k"):
        load_math_dataset("guru_math")  # the fake returns MATH columns, which Guru lacks
    assert calls == [("LLM360/guru-RL-92k", None, "train", "train/math__combined_54.4k.parquet")]
