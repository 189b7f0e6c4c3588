r"""Loaders that turn the usual math sources into TRL's `prompt` / `solution` columns.

Every loader returns a `datasets.Dataset` with exactly three columns:

* `prompt`: chat messages, `[{"role": "user", "content": question + "\n" + INSTRUCTION}]`, preceded by
  `{"role": "system", "content": system_prompt}` when a system prompt is given;
* `solution`: the gold *final answer* as a string (not a worked solution), ready for
  [`gnivo_trl.rewards.math_accuracy_reward`][gnivo_trl.rewards.math_accuracy_reward];
* `source`: the registry name (or, for Guru, the row's `data_source`), for per-source metrics. TRL passes it to
  reward functions as a keyword argument, which they ignore.

Rows whose gold answer cannot be extracted (e.g. a MATH solution without `\boxed`) are dropped with a warning.

Examples:
    ```python
    from gnivo_trl.data import load_math_dataset

    train = load_math_dataset("math")  # MATH from the Hub
    # or load_math_dataset("math500", "math500.jsonl"): a local file
    test = load_math_dataset("math500")
    print(train.column_names)  # ['prompt', 'solution', 'source']
    ```

Registered sources (`DATASETS`) and the layouts assumed. Column layouts were checked against the dataset cards
where they could be found; confidence is stated per source, and loaders accept a few alternative column names so
that mirrors with `problem` instead of `question` (or the reverse) load too.

* `math`: `DigitalLearningGmbH/MATH-lighteval` (config `default`), split `train`. Columns `problem`,
  `solution` (worked solution; the gold answer is its last `\boxed{}`), `level`, `type`. Confidence: high.
* `hendrycks_math`: `EleutherAI/hendrycks_math`, its seven subject configs (`algebra` ...
  `precalculus`) concatenated, split `train`; same columns as `math`. Confidence: high.
* `math500`: `HuggingFaceH4/MATH-500`, split `test`. Columns `problem`, `solution`, `answer` (used),
  `subject`, `level`, `unique_id`. Confidence: high.
* `gsm8k`: `openai/gsm8k` (config `main`), split `train`. Columns `question`, `answer` (worked solution
  ending in `#### 42`; the gold answer is what follows the last `####`, thousands commas removed).
  Confidence: high.
* `aime24`: `HuggingFaceH4/aime_2024`, split `train`. Columns `id`, `problem`, `solution`, `answer`
  (string), `url`, `year`. Confidence: high.
* `aime25`: `yentinglin/aime_2025`, split `train`, assumed `problem` + `answer` like `aime_2024`
  (confidence: medium). `opencompass/AIME2025` (`question` + `answer`) loads with
  `config=["AIME2025-I", "AIME2025-II"], split="test"` (confidence: medium).
* `amc23`: `math-ai/amc23`, split `test`. Columns `question` + `answer`, the answer possibly a float
  (`27.0` becomes `"27"`). Confidence: medium.
* `minerva`: `math-ai/minervamath`, split `test`. Columns `question`, `answer`. Confidence: high.
* `olympiadbench`: `Hothan/OlympiadBench` (config `OE_TO_maths_en_COMP`: the 675 English, text-only,
  open-ended maths problems), split `train`. Columns `question` and `final_answer` (a list of `$...$`
  strings, joined with `, `), plus `solution`, `context`, `image_1`..`image_5`, `is_multiple_answer`,
  `unit`, `answer_type` and more. Confidence: medium. `math-ai/olympiadbench` (split `test`) is assumed to
  have `question` + `final_answer` too (low: one revision of its card lists `problem`, `solution`,
  `domain`; `problem` is accepted, a `solution`-only file is rejected with an error naming the column).
* `guru_math`: `LLM360/guru-RL-92k`, file `train/math__combined_54.4k.parquet`, split `train`.
  Confidence: medium (layout from the verl format and Reasoning360's preprocessing scripts, not from the file).

Guru (the VIMPO training set) is verl-formatted: `data_source`, `prompt` (a list of chat messages whose user
message is the question followed by " Please output the final answer within \boxed{}."), `ability`,
`reward_model` (`{"ground_truth": ..., "style": "rule"}`) and `extra_info` (`index`, `split` and, from
Reasoning360's scripts, `original_question`); in the "extra-info-compressed" variant `reward_model` and
`extra_info` are JSON strings, which are decoded. The question is `extra_info["original_question"]` when present,
else the user message without that trailing instruction. Its prompts are rebuilt with `INSTRUCTION` like every
other source, so all sources share one prompt format (the original instruction differs only in wording).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rewards import extract_gold_answer, last_boxed_content

__all__ = ["DATASETS", "INSTRUCTION", "DatasetSpec", "build_prompt", "load_math_dataset"]

logger = logging.getLogger(__name__)

#: The instruction appended to every question.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TRAILING_BOX_INSTRUCTION_RE = re.compile(
    r"\s*(?:Please\s+)?(?:reason step by step,?\s+and\s+)?(?:output|put)\s+(?:the|your)\s+final\s+answer\s+"
    r"(?:with)?in\s+\\boxed\{\}\.?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one source and find its question and gold answer.

    Attributes:
        hub_id: Default Hub dataset id.
        default_split: Split used when `load_math_dataset` gets none (local files always have `train`).
        question_columns: Candidate question columns; the first one present is used.
        answer_columns: Candidate answer columns; the first one present is used.
        answer_from_value: Turns the answer column's value into the gold final answer (`None` drops the row).
        configs: Hub configs, loaded and concatenated (`(None,)` for the default config).
        hub_data_files: `data_files` for `load_dataset` on the Hub (`None` for the dataset's own layout).
        question_from_row: Overrides `question_columns` for sources whose question must be dug out of the row.
        description: One line for error messages and docs.

    Examples:
        ```python
        from gnivo_trl.data import DATASETS

        spec = DATASETS["gsm8k"]
        print(spec.hub_id, spec.default_split, spec.answer_from_value("#### 1,234"))
        ```
    """

    hub_id: str
    default_split: str
    question_columns: tuple[str, ...]
    answer_columns: tuple[str, ...]
    answer_from_value: Callable[[Any], str | None]
    configs: tuple[str | None, ...] = (None,)
    hub_data_files: str | None = None
    question_from_row: Callable[[Mapping[str, Any]], str | None] | None = None
    description: str = ""


# ----------------------------------------------------------------------------------------------------------------------
# Answer and question extraction per source.
# ----------------------------------------------------------------------------------------------------------------------


def _answer_from_boxed_solution(solution: Any) -> str | None:
    """MATH: the last `\\boxed{}` of the worked solution."""
    if not isinstance(solution, str):
        return None
    answer = last_boxed_content(solution)
    return extract_gold_answer(answer) if answer else None


def _answer_from_gsm8k(answer: Any) -> str | None:
    """GSM8K: what follows the last `####`, thousands commas removed (`"#### 1,234"` -> `"1234"`)."""
    if not isinstance(answer, str) or "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").strip()
    return final or None


def _answer_as_is(answer: Any) -> str | None:
    """A final-answer column: numbers formatted (`27.0` -> `"27"`), `$...$` stripped, lists joined."""
    return extract_gold_answer(answer)


def _decode_json_field(value: Any) -> Any:
    """Guru's compressed variant stores `reward_model` / `extra_info` as JSON strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _answer_from_reward_model(reward_model: Any) -> str | None:
    """verl / Guru: `reward_model["ground_truth"]`."""
    reward_model = _decode_json_field(reward_model)
    if isinstance(reward_model, Mapping):
        return extract_gold_answer(reward_model.get("ground_truth"))
    return None


def _question_from_verl_row(row: Mapping[str, Any]) -> str | None:
    """verl / Guru: `extra_info["original_question"]` when present, else the last user message of `prompt`
    without its trailing boxed-answer instruction."""
    extra_info = _decode_json_field(row.get("extra_info"))
    if isinstance(extra_info, Mapping):
        original = extra_info.get("original_question")
        if isinstance(original, str) and original.strip():
            return original.strip()
    messages = row.get("prompt")
    if isinstance(messages, str):
        return _TRAILING_BOX_INSTRUCTION_RE.sub("", messages).strip() or None
    if isinstance(messages, Sequence):
        users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
        if users and isinstance(users[-1].get("content"), str):
            return _TRAILING_BOX_INSTRUCTION_RE.sub("", users[-1]["content"]).strip() or None
    return None


_MATH_COLUMNS = {"question_columns": ("problem",), "answer_columns": ("solution",)}
_MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

#: Registered sources, by name.
DATASETS: dict[str, DatasetSpec] = {
    "math": DatasetSpec(
        hub_id="DigitalLearningGmbH/MATH-lighteval",
        default_split="train",
        configs=("default",),
        answer_from_value=_answer_from_boxed_solution,
        description="MATH (Hendrycks et al.), 7.5k train / 5k test, gold answer boxed in the solution",
        **_MATH_COLUMNS,
    ),
    "hendrycks_math": DatasetSpec(
        hub_id="EleutherAI/hendrycks_math",
        default_split="train",
        configs=_MATH_SUBJECTS,
        answer_from_value=_answer_from_boxed_solution,
        description="MATH as EleutherAI/hendrycks_math, one config per subject",
        **_MATH_COLUMNS,
    ),
    "math500": DatasetSpec(
        hub_id="HuggingFaceH4/MATH-500",
        default_split="test",
        question_columns=("problem",),
        answer_columns=("answer",),
        answer_from_value=_answer_as_is,
        description="MATH-500 test subset",
    ),
    "gsm8k": DatasetSpec(
        hub_id="openai/gsm8k",
        default_split="train",
        configs=("main",),
        question_columns=("question",),
        answer_columns=("answer",),
        answer_from_value=_answer_from_gsm8k,
        description="GSM8K, answer after '####'",
    ),
    "aime24": DatasetSpec(
        hub_id="HuggingFaceH4/aime_2024",
        default_split="train",
        question_columns=("problem", "question"),
        answer_columns=("answer",),
        answer_from_value=_answer_as_is,
        description="AIME 2024 I and II, 30 problems",
    ),
    "aime25": DatasetSpec(
        hub_id="yentinglin/aime_2025",
        default_split="train",
        question_columns=("problem", "question"),
        answer_columns=("answer",),
        answer_from_value=_answer_as_is,
        description="AIME 2025 I and II, 30 problems",
    ),
    "amc23": DatasetSpec(
        hub_id="math-ai/amc23",
        default_split="test",
        question_columns=("question", "problem"),
        answer_columns=("answer",),
        answer_from_value=_answer_as_is,
        description="AMC 2023, 40 problems",
    ),
    "minerva": DatasetSpec(
        hub_id="math-ai/minervamath",
        default_split="test",
        question_columns=("question", "problem"),
        answer_columns=("answer",),
        answer_from_value=_answer_as_is,
        description="Minerva Math (OCWCourses), 272 problems",
    ),
    "olympiadbench": DatasetSpec(
        hub_id="Hothan/OlympiadBench",
        default_split="train",
        configs=("OE_TO_maths_en_COMP",),
        question_columns=("question", "problem"),
        answer_columns=("final_answer", "answer"),
        answer_from_value=_answer_as_is,
        description="OlympiadBench, English text-only open-ended maths (675 problems)",
    ),
    "guru_math": DatasetSpec(
        hub_id="LLM360/guru-RL-92k",
        default_split="train",
        hub_data_files="train/math__combined_54.4k.parquet",
        question_columns=("prompt",),
        answer_columns=("reward_model",),
        answer_from_value=_answer_from_reward_model,
        question_from_row=_question_from_verl_row,
        description="Guru math subset (verl format), the VIMPO training set",
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------------------------


def build_prompt(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages for one question: an optional system message, then `question + "\\n" + INSTRUCTION`."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": question.strip() + "\n" + INSTRUCTION})
    return messages


def _first_present(candidates: tuple[str, ...], columns: Sequence[str]) -> str | None:
    return next((column for column in candidates if column in columns), None)


def _load_raw(
    spec: DatasetSpec,
    path_or_hub_id: str | None,
    split: str,
    config: str | Sequence[str] | None,
    cache_dir: str | None,
) -> tuple[Any, str]:
    """The raw dataset and a description of where it came from (for error messages)."""
    import datasets

    source = path_or_hub_id or spec.hub_id
    suffix = Path(source).suffix.lower()
    if suffix in _LOCAL_BUILDERS or Path(source).exists():
        if not Path(source).is_file():
            raise FileNotFoundError(f"no such file: {source}")
        if suffix not in _LOCAL_BUILDERS:
            raise ValueError(f"{source}: local files must end in {', '.join(sorted(_LOCAL_BUILDERS))}")
        raw = datasets.load_dataset(
            _LOCAL_BUILDERS[suffix], data_files=str(source), split="train", cache_dir=cache_dir
        )
        return raw, f"file {source}"

    configs: Sequence[str | None]
    if config is None:
        configs = spec.configs
    elif isinstance(config, str):
        configs = (config,)
    else:
        configs = tuple(config)
    parts = [
        datasets.load_dataset(source, name, split=split, data_files=spec.hub_data_files, cache_dir=cache_dir)
        for name in configs
    ]
    raw = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return raw, f"Hub dataset {source} (split {split!r})"


def load_math_dataset(
    name: str,
    path_or_hub_id: str | None = None,
    split: str | None = None,
    system_prompt: str | None = None,
    num_proc: int | None = None,
    *,
    config: str | Sequence[str] | None = None,
    cache_dir: str | None = None,
) -> Any:
    """Load a registered math source as a `datasets.Dataset` with `prompt`, `solution` and `source`.

    Args:
        name: A key of `DATASETS`.
        path_or_hub_id: A local `.jsonl` / `.json` / `.parquet` file in the source's layout, or a Hub dataset id;
            defaults to the source's Hub id.
        split: Hub split; defaults to the source's usual one. Ignored for local files (their only split is `train`).
        system_prompt: Optional system message put before the user message.
        num_proc: Processes for `Dataset.map`.
        config: Hub config(s), overriding the source's (several are concatenated).
        cache_dir: `datasets` cache directory.

    Raises:
        KeyError: `name` is not registered (the message lists the known names).
        ValueError: The data lacks a question or answer column (the message names the column and the file).
    """
    if name not in DATASETS:
        raise KeyError(f"unknown math dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    raw, origin = _load_raw(spec, path_or_hub_id, split or spec.default_split, config, cache_dir)

    question_column = _first_present(spec.question_columns, raw.column_names)
    answer_column = _first_present(spec.answer_columns, raw.column_names)
    for role, column, candidates in (
        ("question", question_column, spec.question_columns),
        ("answer", answer_column, spec.answer_columns),
    ):
        if column is None:
            wanted = " or ".join(repr(c) for c in candidates)
            raise ValueError(
                f"{origin} has no {role} column {wanted} expected for dataset {name!r}; "
                f"its columns are {raw.column_names}"
            )

    def to_trl(row: dict[str, Any]) -> dict[str, Any]:
        if spec.question_from_row is not None:
            question = spec.question_from_row(row)
        else:
            question = row[question_column]
        answer = spec.answer_from_value(row[answer_column])
        data_source = row.get("data_source") if name == "guru_math" else None
        return {
            "prompt": build_prompt(question, system_prompt)
            if isinstance(question, str) and question.strip()
            else None,
            "solution": answer or "",
            "source": data_source if isinstance(data_source, str) and data_source else name,
        }

    mapped = raw.map(to_trl, remove_columns=raw.column_names, num_proc=num_proc, desc=f"Formatting {name}")
    kept = mapped.filter(lambda row: bool(row["solution"]) and row["prompt"] is not None, num_proc=num_proc)
    kept = kept.select_columns(["prompt", "solution", "source"])
    dropped = len(mapped) - len(kept)
    if dropped:
        logger.warning("%s: dropped %d of %d rows without a question or gold answer", origin, dropped, len(mapped))
    return kept
