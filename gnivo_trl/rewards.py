r"""Verifiable math rewards for TRL trainers: [`math_accuracy_reward`][gnivo_trl.rewards.math_accuracy_reward] and
[`format_reward`][gnivo_trl.rewards.format_reward].

Both follow TRL's reward-function convention: they take `completions` (plain strings, or conversational lists such
as `[{"role": "assistant", "content": "..."}]`), the dataset columns as keyword arguments (`solution` holds the
gold answers, one per completion) and return one float per completion. Extra keyword arguments (`trainer_state`,
`log_metric`, other dataset columns) are ignored; `log_extra`, when the trainer passes it, receives the extracted
answers as the `math_answer` column of the completions table.

Equivalence is decided symbolically by `math-verify <https://github.com/huggingface/Math-Verify>`_ (`parse` +
`verify` with its LaTeX and plain-expression extraction configs), which is built on `latex2sympy2_extended`, the
maintained fork of latex2sympy2. The original `latex2sympy2` on PyPI pins `antlr4` 4.7.2 and cannot be installed
beside math-verify or TRL; it is not used. math-verify is imported lazily: install it with
`pip install gnivo-trl[math]`.

Decisions, in the order a completion meets them:

* **Final text.** If the completion contains `</think>`, only the text after the *last* `</think>` counts. If it
  opens `<think>` and never closes it, the reasoning was cut off and there is no final answer (reward 0.0). An
  answer that only appears inside the reasoning earns nothing.
* **Extraction.** The *last* `\boxed{...}` (or `\fbox{...}`, or `\boxed 5`) of the final text is the answer;
  braces are matched with nesting, and escaped braces (`\{`, `\}`) are content. If that last box is empty or its
  braces never close (truncated output), the answer is missing (0.0): the model's last committed answer is broken, and
  falling back to an earlier box or to prose would reward something it retracted. Only when there is no box at all are
  fallbacks tried, on the last `FALLBACK_WINDOW_CHARS` characters: the last "final answer is X" / "the answer
  is X" / "Answer: X" line, then the last GSM8K-style "#### X", then a math span (`$...$`, `$$...$$`, `\(...\)`,
  `\[...\]`) that ends the text. A bare number somewhere in the prose is *not* taken: that would reward guessing.
* **Normalisation** (ours, before math-verify's own, each fixing a case math-verify gets wrong): outer math
  delimiters are stripped; `°` becomes `^\circ`; thin-space thousands separators are removed (math-verify reads
  `1\,000` as `1 \cdot 000 = 0`); a number set in text mode is taken out of it (`\text{5 cm}` becomes
  `5\text{ cm}`, whose unit math-verify drops); a repeating decimal `0.1\overline{6}` becomes the exact fraction.
* **Gold answers** may be bare (`"1/2"`, `"\frac{1}{2}"`), boxed, a full MATH-style solution containing a box (the
  last box is the answer), a GSM8K answer ending in `#### 42`, a number, or a list of answers (joined with `, `,
  which math-verify reads as a set). A gold answer that is empty, or that math-verify cannot turn into a sympy object
  (broken LaTeX such as `\frac{1}{`, bare symbols such as `@@@`), gets reward `None`: TRL's convention for
  "no reward for this function on this row", so the row does not count as a failure. A warning is logged once.
* **Verdict.** 1.0 when `verify(gold, answer)` holds, else 0.0. An answer longer than `MAX_ANSWER_CHARS` is
  0.0 without parsing. Anything raised while scoring one answer is caught and scores 0.0 (or `None` when it was the
  gold answer that failed): model output never raises. Behaviours inherited from math-verify worth knowing: numeric
  comparison rounds to 6 decimals (`0.3333333` equals `\frac{1}{3}`, `0.333` does not, nor does `3.14` equal
  `\pi`); percentages compare either way (`50\%` equals both `50` and `0.5`); `(1, 2)` is read as an open
  interval, which math-verify lets equal the set `\{1, 2\}`; an assignment `x = 5` equals `5`; degrees are
  never converted to radians. We pass `allow_set_relation_comp=True` so that an inequality such as `x > 3` equals
  the interval `(3, \infty)` whichever side is the gold answer (math-verify's default only allows it one way).
* **Time bound.** math-verify bounds parsing (`PARSING_TIMEOUT_SECONDS`) and each comparison
  (`VERIFY_TIMEOUT_SECONDS`) with `signal.alarm`, so one answer costs at most about
  `PARSING_TIMEOUT_SECONDS + VERIFY_TIMEOUT_SECONDS` seconds (plus once per distinct gold answer, whose parse is
  cached). The constants are read at call time; assign them on this module to change the bound. `signal.alarm`
  works only in the main thread (TRL calls synchronous reward functions there). Called from any other thread, the
  batch is scored in a child Python process, whose main thread can use the alarm, under a hard wall-clock limit; if
  the child cannot run or overruns, the batch scores 0.0 and a warning is logged. Timeouts need a POSIX system.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

__all__ = [
    "FALLBACK_WINDOW_CHARS",
    "MAX_ANSWER_CHARS",
    "PARSING_TIMEOUT_SECONDS",
    "SUBPROCESS_STARTUP_SECONDS",
    "VERIFY_TIMEOUT_SECONDS",
    "completion_text",
    "extract_final_answer",
    "extract_gold_answer",
    "final_response_text",
    "format_reward",
    "last_boxed_content",
    "math_accuracy_reward",
    "normalize_answer",
]

logger = logging.getLogger(__name__)

#: Seconds math-verify may spend parsing one answer (an integer: math-verify uses ``signal.alarm``).
PARSING_TIMEOUT_SECONDS: int = 2
#: Seconds math-verify may spend on one gold/answer comparison (an integer, as above).
VERIFY_TIMEOUT_SECONDS: int = 2
#: Extracted answers longer than this score 0.0 without being parsed.
MAX_ANSWER_CHARS: int = 1000
#: When a completion has no box, the fallbacks only search its last this-many characters.
FALLBACK_WINDOW_CHARS: int = 4000
#: Start-up allowance (seconds) for the child process used outside the main thread.
SUBPROCESS_STARTUP_SECONDS: float = 60.0

_BOX_COMMAND_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_OR_ESCAPE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_BARE_BOX_ARGUMENT_RE = re.compile(r"[^\s$]+")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANCHORED_ANSWER_RE = re.compile(
    r"\b(?:final\s+answer|answer)\b(?:\s*\*\*)?\s*(?:is\b\s*:?|:)\s*(?P<answer>[^\n]*)", re.IGNORECASE
)
_HASH_ANSWER_RE = re.compile(r"####\s*(?P<answer>[^\n]+)")
_MATH_SPAN = r"\$\$(?P<dd>[^$]+?)\$\$|\$(?P<d>[^$]+?)\$|\\\[(?P<b>.+?)\\\]|\\\((?P<p>.+?)\\\)"
_MATH_SPAN_RE = re.compile(_MATH_SPAN, re.DOTALL)
_TRAILING_MATH_SPAN_RE = re.compile(rf"(?:{_MATH_SPAN})[\s.,;:!]*\Z", re.DOTALL)
_FIRST_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
_THIN_SPACE_THOUSANDS_RE = re.compile(r"(\d)\\,\s*(?=\d{3}(?!\d))")
_OUTER_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_NUMBER_IN_TEXT_RE = re.compile(r"^\\(?:text|textrm|mbox)\{\s*(-?\d[\d.,]*)\s*([^{}]*)\}$")
_REPEATING_DECIMAL_RE = re.compile(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}")

_warned_unparseable_gold = False
_warned_thread = False


# ----------------------------------------------------------------------------------------------------------------------
# Text handling: pure functions, no math-verify needed.
# ----------------------------------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is; for a conversational completion, the content of its last
    assistant message (or of its last message if none has a role). `None` and unknown shapes give `""`."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, Sequence) and completion:
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = assistant or messages
        if chosen:
            return _content_text(chosen[-1].get("content"))
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content parts: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return ""


def final_response_text(text: str) -> str:
    """The part of a completion that carries its final answer: the text after the last `</think>`; `""` when a
    `<think>` block was opened and never closed; otherwise the whole text."""
    if _THINK_CLOSE in text:
        return text.rsplit(_THINK_CLOSE, 1)[1]
    if _THINK_OPEN in text:
        return ""
    return text


def _box_argument(text: str, start: int) -> str | None:
    """The argument of a box command whose name ends at `start`: the brace group (nesting allowed, escaped braces
    are content) or, for `\\boxed 5`, the next token. `None` if the braces never close or nothing follows."""
    position = start
    while position < len(text) and text[position] in " \t":
        position += 1
    if position >= len(text):
        return None
    if text[position] != "{":
        if position == start:  # "\boxed5" is not a box
            return None
        token = _BARE_BOX_ARGUMENT_RE.match(text, position)
        return token.group(0) if token else None
    depth = 0
    for match in _BRACE_OR_ESCAPE_RE.finditer(text, position):
        token = match.group(0)
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1 : match.start()].strip()
    return None


def last_boxed_content(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` / `\fbox{...}` in `text` (`""` for an empty box), or `None`
    when there is no box or the last one is malformed (unbalanced braces)."""
    last = None
    for last in _BOX_COMMAND_RE.finditer(text):  # noqa: B007  (the loop keeps the last match)
        pass
    return None if last is None else _box_argument(text, last.end())


def _clean_inline_answer(answer: str) -> str | None:
    """Trim what follows an answer anchor: the first math span if there is one, else the first sentence."""
    answer = answer.strip().strip("*").strip()
    span = _MATH_SPAN_RE.search(answer)
    if span:
        answer = next(group for group in span.groups() if group is not None)
    else:
        answer = _FIRST_SENTENCE_END_RE.split(answer, maxsplit=1)[0]
    answer = answer.strip().rstrip(".,;:!").strip()
    return answer or None


def _last_anchored_answer(text: str) -> str | None:
    answers = [_clean_inline_answer(m.group("answer")) for m in _ANCHORED_ANSWER_RE.finditer(text)]
    answers = [a for a in answers if a]
    return answers[-1] if answers else None


def _last_hash_answer(text: str) -> str | None:
    matches = list(_HASH_ANSWER_RE.finditer(text))
    return _clean_inline_answer(matches[-1].group("answer")) if matches else None


def _trailing_math_answer(text: str) -> str | None:
    span = _TRAILING_MATH_SPAN_RE.search(text)
    if span is None:
        return None
    answer = next(group for group in span.groups() if group is not None).strip()
    return answer or None


def extract_final_answer(completion: Any) -> str | None:
    """The final answer of a completion (string or conversational), as a string, or `None` when it gives none.
    See the module docstring for the order of the rules."""
    text = final_response_text(completion_text(completion))
    if not text.strip():
        return None
    if _BOX_COMMAND_RE.search(text):
        return last_boxed_content(text) or None
    tail = text[-FALLBACK_WINDOW_CHARS:]
    for finder in (_last_anchored_answer, _last_hash_answer, _trailing_math_answer):
        answer = finder(tail)
        if answer:
            return answer
    return None


def _strip_outer_delimiters(answer: str) -> str:
    for opening, closing in _OUTER_DELIMITERS:
        if len(answer) > len(opening) + len(closing) and answer.startswith(opening) and answer.endswith(closing):
            inner = answer[len(opening) : -len(closing)]
            if opening != "$" or "$" not in inner:
                return inner.strip()
    return answer


def _number_out_of_text(match: re.Match[str]) -> str:
    number, unit = match.group(1), match.group(2).strip()
    return f"{number}\\text{{ {unit}}}" if unit else number


def _repeating_decimal_as_fraction(match: re.Match[str]) -> str:
    sign, integer, fixed, repeating = match.groups()
    integer = integer or "0"
    numerator = int(integer + fixed + repeating) - int(integer + fixed)
    denominator = 10 ** len(fixed) * (10 ** len(repeating) - 1)
    return f"{sign}\\frac{{{numerator}}}{{{denominator}}}"


def normalize_answer(answer: str) -> str:
    r"""Our few normalisations before math-verify's: outer math delimiters; `°` -> `^\circ`; thin-space
    thousands separators (`1\,000` -> `1000`); a number set in text mode (`\text{5 cm}` -> `5\text{ cm}`);
    repeating decimals (`0.1\overline{6}` -> `\frac{15}{90}`)."""
    answer = _strip_outer_delimiters(answer.strip())
    answer = answer.replace("°", "^\\circ")
    answer = _THIN_SPACE_THOUSANDS_RE.sub(r"\1", answer)
    answer = _NUMBER_IN_TEXT_RE.sub(_number_out_of_text, answer)
    answer = _REPEATING_DECIMAL_RE.sub(_repeating_decimal_as_fraction, answer)
    return answer.strip()


def extract_gold_answer(solution: Any) -> str | None:
    """The gold final answer from a `solution` value: the last box of a solution text, what follows the last
    `####` of a GSM8K answer, or the value itself (numbers formatted, lists joined with `, `). `None` if empty."""
    if isinstance(solution, bool) or solution is None:
        return None
    if isinstance(solution, int):
        return str(solution)
    if isinstance(solution, float):
        return str(int(solution)) if solution.is_integer() else repr(solution)
    if isinstance(solution, (list, tuple)):
        parts = [extract_gold_answer(part) for part in solution]
        joined = ", ".join(part for part in parts if part)
        return joined or None
    if not isinstance(solution, str):
        return None
    text = solution.strip()
    if _BOX_COMMAND_RE.search(text):
        answer = last_boxed_content(text)
    elif "####" in text:
        answer = text.rsplit("####", 1)[1]
    else:
        answer = text
    if answer is None:
        return None
    answer = normalize_answer(answer)
    return answer or None


# ----------------------------------------------------------------------------------------------------------------------
# Scoring with math-verify.
# ----------------------------------------------------------------------------------------------------------------------


def _import_math_verify() -> Any:
    try:
        import math_verify
    except ImportError as error:
        raise ImportError(
            "math_accuracy_reward needs the `math-verify` package (with latex2sympy2_extended): "
            "pip install gnivo-trl[math]"
        ) from error
    return math_verify


@functools.cache
def _extraction_config() -> list[Any]:
    math_verify = _import_math_verify()
    return [math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig()]


def _parse(answer: str, parsing_timeout: int | None) -> list[Any]:
    # Wrapping in \boxed{} sends every answer down math-verify's boxed path, whatever its original form.
    return _import_math_verify().parse(
        "\\boxed{" + answer + "}", extraction_config=_extraction_config(), parsing_timeout=parsing_timeout
    )


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, parsing_timeout: int | None) -> tuple[Any, ...] | None:
    """Parsed gold answer, or `None` when math-verify yields no sympy object (only a string or nothing)."""
    parsed = _parse(gold, parsing_timeout)
    return tuple(parsed) if any(not isinstance(item, str) for item in parsed) else None


def _score_answer(answer: str | None, gold: str | None, parsing_timeout: int | None, verify_timeout: int | None):
    """1.0 / 0.0 for one extracted answer against one extracted gold answer; `None` for an unusable gold answer."""
    if gold is None:
        return None
    try:
        gold_parsed = _parse_gold(gold, parsing_timeout)
    except BaseException as error:  # math-verify's TimeoutException derives from BaseException
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise
        gold_parsed = None
    if gold_parsed is None:
        return None
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    try:
        parsed = _parse(normalize_answer(answer), parsing_timeout)
        if not parsed:
            return 0.0
        equal = _import_math_verify().verify(
            list(gold_parsed), parsed, allow_set_relation_comp=True, timeout_seconds=verify_timeout
        )
        return 1.0 if equal else 0.0
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise
        return 0.0


def _score_answers(
    answers: list[str | None], golds: list[str | None], parsing_timeout: int | None, verify_timeout: int | None
) -> list[float | None]:
    return [_score_answer(a, g, parsing_timeout, verify_timeout) for a, g in zip(answers, golds, strict=True)]


_CHILD_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_gnivo_rewards_child", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
job = json.load(sys.stdin)
print(json.dumps(module._score_answers(job["answers"], job["golds"], job["parsing"], job["verify"])))
"""


def _score_answers_in_child(
    answers: list[str | None], golds: list[str | None], parsing_timeout: int, verify_timeout: int
) -> list[float | None]:
    """Score in a fresh interpreter, whose main thread can use `signal.alarm`; used off the main thread."""
    per_answer = parsing_timeout + verify_timeout
    limit = SUBPROCESS_STARTUP_SECONDS + per_answer * len(answers) + parsing_timeout * len(set(golds))
    job = json.dumps({"answers": answers, "golds": golds, "parsing": parsing_timeout, "verify": verify_timeout})
    try:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD_SCRIPT, __file__],
            input=job,
            capture_output=True,
            text=True,
            timeout=limit,
            check=True,
        )
        scores = json.loads(result.stdout.strip().splitlines()[-1])
        if len(scores) != len(answers):
            raise ValueError(f"child returned {len(scores)} scores for {len(answers)} answers")
        return scores
    except Exception as error:  # noqa: BLE001  (any failure of the child scores the batch 0.0)
        logger.warning("math_accuracy_reward: scoring in a child process failed (%s); the batch scores 0.0.", error)
        return [None if gold is None else 0.0 for gold in golds]


def math_accuracy_reward(completions: Sequence[Any], solution: Sequence[Any], **kwargs: Any) -> list[float | None]:
    r"""1.0 if a completion's final answer is mathematically equivalent to the gold answer, else 0.0; `None` where
    the gold answer is unusable. See the module docstring for every rule.

    Examples:
        ```python
        from gnivo_trl.rewards import math_accuracy_reward

        completions = [
            r"so \boxed{\frac{1}{2}}",
            [{"role": "assistant", "content": "The answer is $0.4$."}],
        ]
        print(math_accuracy_reward(completions, solution=["0.5", "1/2"]))  # [1.0, 0.0]
        ```
    """
    global _warned_unparseable_gold, _warned_thread
    _import_math_verify()
    if len(completions) != len(solution):
        raise ValueError(f"got {len(completions)} completions but {len(solution)} solutions")
    answers: list[str | None] = []
    golds: list[str | None] = []
    for completion, gold in zip(completions, solution, strict=True):
        try:
            answers.append(extract_final_answer(completion))
        except Exception:  # noqa: BLE001  (model output never raises)
            answers.append(None)
        try:
            golds.append(extract_gold_answer(gold))
        except Exception:  # noqa: BLE001
            golds.append(None)

    parsing_timeout, verify_timeout = PARSING_TIMEOUT_SECONDS, VERIFY_TIMEOUT_SECONDS
    if threading.current_thread() is threading.main_thread():
        rewards = _score_answers(answers, golds, parsing_timeout, verify_timeout)
    else:
        if not _warned_thread:
            logger.warning(
                "math_accuracy_reward called outside the main thread: math-verify's signal-based timeouts cannot run "
                "here, so batches are scored in a child process."
            )
            _warned_thread = True
        rewards = _score_answers_in_child(answers, golds, parsing_timeout, verify_timeout)

    if not _warned_unparseable_gold:
        unusable = [repr(raw)[:200] for raw, reward in zip(solution, rewards, strict=True) if reward is None]
        if unusable:
            logger.warning(
                "math_accuracy_reward: gold answer %s could not be parsed; such rows get reward None (skipped). "
                "This warning is shown once.",
                unusable[0],
            )
            _warned_unparseable_gold = True

    log_extra = kwargs.get("log_extra")
    if callable(log_extra):
        log_extra("math_answer", ["" if answer is None else answer for answer in answers])
    return rewards


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    r"""1.0 if the final text (after the last `</think>`) holds exactly one `\boxed{}`/`\fbox{}` and it is
    well-formed and non-empty, else 0.0."""
    rewards = []
    for completion in completions:
        try:
            text = final_response_text(completion_text(completion))
            boxes = list(_BOX_COMMAND_RE.finditer(text))
            well_formed = len(boxes) == 1 and bool(_box_argument(text, boxes[0].end()))
        except Exception:  # noqa: BLE001
            well_formed = False
        rewards.append(1.0 if well_formed else 0.0)
    return rewards
