r"""Verifiable math rewards for TRL trainers: [`math_accuracy_reward`][gnivo_trl.rewards.math_accuracy_reward] and
[`format_reward`][gnivo_trl.rewards.format_reward]; and [`NoisyReward`][gnivo_trl.rewards.NoisyReward], which flips
a 0/1 reward at random (each reward on its own, or a prompt's whole group at once) to test how a method copes with
a noisy verifier.

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
import hashlib
import inspect
import json
import logging
import math
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "FALLBACK_WINDOW_CHARS",
    "MAX_ANSWER_CHARS",
    "NOISE_MODES",
    "NoisyReward",
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


# ----------------------------------------------------------------------------------------------------------------------
# Reward noise: a 0/1 reward flipped at random, for robustness tests.
# ----------------------------------------------------------------------------------------------------------------------

#: The noise models of :class:`NoisyReward`: ``"group"`` flips every reward of a prompt's group together (the VIMPO
#: authors' ``group_flip_binary_score``), ``"independent"`` flips each reward on its own.
NOISE_MODES = ("group", "independent")


def _unit_draw(seed: int, step: int, key: str) -> float:
    """A uniform number in [0, 1) that depends only on ``(seed, step, key)``: the first 8 bytes of a BLAKE2b digest
    of ``"{seed}:{step}:{key}"`` read as a little-endian integer over 2**64 (the VIMPO authors' construction)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, byteorder="little", signed=False) / 2.0**64


def _process_index() -> int:
    """This process's rank in the default ``torch.distributed`` group (TRL's ``accelerator.process_index``), 0 when
    no process group is initialised or torch is not imported."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank()


class NoisyReward:
    r"""A 0/1 reward function whose rewards are flipped (`r -> 1 - r`) at random, to test robustness to a noisy
    verifier.

    Wrap the reward you want to corrupt and pass the wrapper to a TRL trainer (`GRPOTrainer`, `RLOOTrainer`,
    `GNIVOTrainer`, `VIMPOTrainer`) in its place. Keep shaped terms (format, length) in separate reward functions:
    TRL sums them after the flip. Evaluate with the exact reward.

    Two noise models (`mode`):

    * `"group"`: with probability `flip_probability` per prompt group, every reward of the group (the
      `num_generations` completions of one prompt) is flipped. This is the VIMPO authors' noise model
      (`apply_group_reward_noise`, mode `group_flip_binary_score`, in their `recipe/dapo/dapo_ray_trainer.py`):
      a flipped group's centred rewards change sign exactly, so its gradient points the wrong way.
    * `"independent"`: each reward is flipped on its own with probability `flip_probability`; this also changes
      which groups carry any signal.

    **Draws.** Each decision is one uniform number, the first 8 bytes of the BLAKE2b digest of
    `"{seed}:{step}:{key}"` over 2**64, flipped when it is below `flip_probability` (as the authors' code does).
    `step` is `trainer_state.global_step`, which TRL passes to every reward function. The key is the group's
    index `g` in the global generation batch (`"{g}"`), or, for independent flips, the completion's group and place
    in it (`"{g}/{j}"`). The authors key a group by a random `uuid4`; a deterministic key instead makes the
    flips a function of `(seed, step, position)`: every method trained with the same `seed` (TRL's sampler then
    gives the same prompts in the same order) sees the same flips, a larger probability flips a superset of a
    smaller one's, and every process of a distributed run computes the same decision for a group.

    **Finding the group.** TRL's `RepeatSampler` lays a generation batch out as `num_generations` consecutive
    copies of each prompt, and the data loader hands process `r` the contiguous slice
    `[r * n, (r + 1) * n)` of it, `n` the number of completions each process scores (the same on every process).
    TRL computes advantages on the gathered batch over consecutive runs of `num_generations` rows, so the
    completion at local index `i` of process `r` belongs to group `(r * n + i) // num_generations`, the same group
    TRL normalises it with, including a group split between two processes. The process index is the rank of the
    default `torch.distributed` process group (TRL's `accelerator.process_index`; 0 on one process). As a check,
    the rows of one group must share their prompt; a mismatch (a `num_generations` that is not the trainer's, a
    batch not laid out by TRL) raises.

    `None` rewards (TRL's "no reward for this row") and NaN stay as they are; a flipped group flips its other
    rewards. Rewards must be 0 or 1 (booleans included): anything else raises, because `1 - r` is a flip only for
    a binary reward.

    Args:
        reward_func: A TRL reward function returning 0/1 rewards (or `None`) for `completions`. It is called with
            every keyword argument the trainer passes (`prompts`, `completions`, `completion_ids`,
            `trainer_state`, dataset columns, ...). Synchronous functions only.
        flip_probability: The probability `p` in [0, 1] that a group (`"group"`) or a reward (`"independent"`)
            is flipped.
        mode: `"group"` or `"independent"` (:data:`NOISE_MODES`).
        num_generations: The trainer's `num_generations` (K). Required: both models key a completion by its group.
        seed: The seed of the draws; use the trainer's `seed` so that methods compared at a seed see the same flips.

    Attributes:
        flipped: Rewards this process flipped so far.
        scored: Rewards (not `None`) this process scored so far.
        groups: Groups with a row on this process so far (a group split between processes counts on each).
        groups_flipped: Those of them whose draw was a flip (group mode; 0 otherwise).

    Example:
        ```python
        from types import SimpleNamespace

        from gnivo_trl.rewards import NoisyReward


        def correct(completions, **kwargs):
            return [
                1.0 if completion.strip() == "4" else 0.0 for completion in completions
            ]


        noisy = NoisyReward(
            correct, flip_probability=0.5, mode="group", num_generations=4, seed=0
        )
        # TRL passes `prompts` and `trainer_state`; outside a trainer, any
        # object with `global_step` will do.
        for step in range(3):
            rewards = noisy(
                prompts=["2+2="] * 8,
                completions=["4", "4", "5", "4", "3", "4", "4", "4"],
                trainer_state=SimpleNamespace(global_step=step),
            )
            print(step, rewards)  # each group of 4 exact or flipped as a whole
        # 0 [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]   the second group flipped
        # 1 [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
        # 2 [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        print(noisy.stats()["flip_rate"])  # 0.333...: 8 of 24 rewards
        ```

        In training: `GRPOTrainer(..., reward_funcs=NoisyReward(math_accuracy_reward, 0.25,
        num_generations=config.num_generations, seed=config.seed), args=config)`.
    """

    def __init__(
        self,
        reward_func: Callable[..., Sequence[float | None]],
        flip_probability: float,
        *,
        mode: str = "group",
        num_generations: int,
        seed: int = 0,
    ) -> None:
        if not callable(reward_func):
            raise TypeError(f"reward_func must be a reward function, got {type(reward_func).__name__}")
        if inspect.iscoroutinefunction(reward_func) or inspect.iscoroutinefunction(type(reward_func).__call__):
            raise TypeError("NoisyReward wraps synchronous reward functions; got an async one")
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability={flip_probability} is not a probability; use a value in [0, 1]")
        if mode not in NOISE_MODES:
            raise ValueError(f"mode={mode!r} is not a noise model; use one of {', '.join(map(repr, NOISE_MODES))}")
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
            raise ValueError(
                f"num_generations={num_generations!r} must be the trainer's num_generations (a positive integer)"
            )
        self.reward_func = reward_func
        self.flip_probability = float(flip_probability)
        self.mode = mode
        self.num_generations = num_generations
        self.seed = seed
        # TRL logs each reward under its function's name (trl.trainer.utils.get_callable_name).
        self.__name__ = getattr(reward_func, "__name__", type(reward_func).__name__)
        self.flipped = 0
        self.scored = 0
        self.groups = 0
        self.groups_flipped = 0

    def flip_mask(self, step: int, start: int, count: int) -> list[bool]:
        """Whether each of the completions at global positions `start, ..., start + count - 1` of the generation
        batch of `step` is flipped (whatever its reward)."""
        k = self.num_generations
        if self.mode == "group":
            decisions = {
                group: _unit_draw(self.seed, step, str(group)) < self.flip_probability
                for group in range(start // k, (start + count - 1) // k + 1)
            }
            return [decisions[position // k] for position in range(start, start + count)]
        return [
            _unit_draw(self.seed, step, f"{position // k}/{position % k}") < self.flip_probability
            for position in range(start, start + count)
        ]

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        state = kwargs.get("trainer_state")
        if state is None or not hasattr(state, "global_step"):
            raise ValueError(
                "NoisyReward draws its flips per training step and needs `trainer_state` (TRL's GRPOTrainer and "
                "RLOOTrainer pass it to every reward function); outside a trainer pass an object with `global_step`"
            )
        rewards = list(self.reward_func(completions=completions, **kwargs))
        if len(rewards) != len(completions):
            raise ValueError(f"{self.__name__} returned {len(rewards)} rewards for {len(completions)} completions")
        k = self.num_generations
        start = _process_index() * len(completions)
        prompts = kwargs.get("prompts")
        if prompts is not None:
            for index in range(1, len(completions)):
                if (start + index) % k and prompts[index] != prompts[index - 1]:
                    raise ValueError(
                        f"rows {index - 1} and {index} belong to group {(start + index) // k} but have different "
                        f"prompts: num_generations={k} is not the trainer's num_generations, or the batch is not laid "
                        "out as TRL's RepeatSampler lays it out (K consecutive completions per prompt)"
                    )
        step = int(state.global_step)
        flips = self.flip_mask(step, start, len(completions))
        noisy: list[float | None] = []
        batch_flipped = batch_scored = 0
        for position, (reward, flip) in enumerate(zip(rewards, flips, strict=True)):
            if reward is None or (isinstance(reward, float) and math.isnan(reward)):
                noisy.append(reward)
                continue
            if reward not in (0, 1):  # 0, 1, 0.0, 1.0, False, True
                raise ValueError(
                    f"{self.__name__} returned {reward!r} at position {position}; NoisyReward flips 0/1 rewards "
                    "(r -> 1 - r). Wrap only the binary part (e.g. the accuracy reward) and pass shaped terms as "
                    "separate reward functions"
                )
            batch_scored += 1
            batch_flipped += flip
            noisy.append(1.0 - float(reward) if flip else float(reward))
        self.scored += batch_scored
        self.flipped += batch_flipped
        first_group, last_group = start // k, (start + len(completions) - 1) // k
        self.groups += last_group - first_group + 1
        if self.mode == "group":
            self.groups_flipped += sum(flips[max(0, g * k - start)] for g in range(first_group, last_group + 1))
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and batch_scored:
            log_metric(f"reward_noise/{self.__name__}/flip_rate", batch_flipped / batch_scored)
        return noisy

    def stats(self) -> dict[str, float | int | str]:
        """This process's counts so far: `mode`, `flip_probability`, `flipped`, `scored`, the realised `flip_rate`
        (NaN before any scored reward), `groups` and `groups_flipped`."""
        return dict(
            mode=self.mode,
            flip_probability=self.flip_probability,
            flipped=self.flipped,
            scored=self.scored,
            flip_rate=self.flipped / self.scored if self.scored else math.nan,
            groups=self.groups,
            groups_flipped=self.groups_flipped,
        )
