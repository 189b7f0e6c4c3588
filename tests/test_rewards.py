r"""Tests for :mod:`gnivo_trl.rewards`: a hand-written grading table plus robustness and time-bound checks.

Every row of ``TABLE`` states what a careful human grader would say. Where math-verify's verdict is defensible but
not the only reasonable one, the row records math-verify's verdict and a comment says why (``# math-verify: ...``).
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("math_verify")

from gnivo_trl import rewards  # noqa: E402
from gnivo_trl.rewards import (  # noqa: E402
    extract_final_answer,
    extract_gold_answer,
    format_reward,
    last_boxed_content,
    math_accuracy_reward,
)


def chat(content):
    return [{"role": "assistant", "content": content}]


# (id, completion, gold, expected reward)
TABLE = [
    # --- fractions, decimals, \dfrac / \tfrac ---
    ("frac-vs-decimal", r"So the probability is \boxed{\frac{1}{2}}.", "0.5", 1.0),
    ("decimal-vs-frac", r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("dfrac", r"\boxed{\dfrac{1}{2}}", "1/2", 1.0),
    ("tfrac", r"\boxed{\tfrac{3}{4}}", "0.75", 1.0),
    ("frac-shorthand", r"\boxed{\frac12}", "0.5", 1.0),
    ("leading-dot-decimal", r"\boxed{.5}", "1/2", 1.0),
    ("wrong-fraction", r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
    ("repeating-decimal-6dp", r"\boxed{0.3333333}", r"\frac{1}{3}", 1.0),  # math-verify rounds to 6 decimals
    ("rounded-decimal-too-coarse", r"\boxed{0.333}", r"\frac{1}{3}", 0.0),
    ("repeating-decimal-overline", r"\boxed{0.1\overline{6}}", r"\frac{1}{6}", 1.0),  # fixed in normalize_answer
    # --- roots ---
    ("sqrt-over-2", r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt2}{2}", 1.0),
    ("rationalised", r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1.0),
    ("sqrt-simplified", r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),
    ("sqrt-27", r"\boxed{3\sqrt{3}}", r"\sqrt{27}", 1.0),
    ("wrong-root", r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0),
    # --- pi ---
    ("pi-commuted", r"\boxed{\pi \cdot 2}", r"2\pi", 1.0),
    ("pi-numeric-8dp", r"\boxed{3.14159265}", r"\pi", 1.0),
    ("pi-two-decimals", r"\boxed{3.14}", r"\pi", 0.0),  # an approximation is not the exact answer
    ("pi-over-2", r"\boxed{\frac{\pi}{2}}", r"\frac{1}{2}\pi", 1.0),
    # --- intervals ---
    ("half-open-interval", r"\boxed{(0, 1]}", "(0,1]", 1.0),
    ("interval-wrong-bracket", r"\boxed{[0,1]}", "(0,1]", 0.0),
    ("interval-infinity", r"\boxed{(-\infty,3)}", r"(-\infty, 3)", 1.0),
    ("interval-union-order", r"\boxed{(1, \infty) \cup (-\infty, 0)}", r"(-\infty, 0) \cup (1, \infty)", 1.0),
    ("interval-open-vs-closed-left", r"\boxed{(2,5)}", "[2,5)", 0.0),
    ("interval-vs-membership", r"\boxed{(0,1]}", r"x \in (0,1]", 1.0),
    ("inequality-vs-interval", r"\boxed{x>3}", r"(3,\infty)", 1.0),  # needs allow_set_relation_comp=True
    ("inequality-wrong-endpoint", r"\boxed{x<2}", r"(-\infty,2]", 0.0),
    # --- tuples and sets ---
    ("pair", r"\boxed{(1, 2)}", "(1,2)", 1.0),
    ("pair-order-matters", r"\boxed{(2,1)}", "(1,2)", 0.0),
    ("triple", r"\boxed{(1, 2, 3)}", "(1,2,3)", 1.0),
    ("triple-order-matters", r"\boxed{(3,2,1)}", "(1,2,3)", 0.0),
    ("set-order-irrelevant", r"\boxed{\{2,1\}}", r"\{1,2\}", 1.0),
    ("set-three", r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}", 1.0),
    ("list-of-roots-order", r"The roots are \boxed{2, 1}", "1, 2", 1.0),
    ("roots-as-equations", r"\boxed{x=1, x=2}", "1,2", 1.0),
    ("set-missing-element", r"\boxed{\{1,2\}}", r"\{1,2,3\}", 0.0),
    # math-verify: "(1,2)" is read as the open interval, which math-verify lets equal the set {1, 2} (and vice versa).
    # A strict grader would call a pair for a set wrong; we keep math-verify's leniency, as TRL's accuracy_reward does.
    ("pair-vs-set-lenient", r"\boxed{(1,2)}", r"\{1,2\}", 1.0),
    ("polar-pair-left-right", r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3, \pi/2)", 1.0),
    ("column-vector", r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
    # --- percents ---
    ("percent-vs-number", r"\boxed{50\%}", "50", 1.0),
    ("number-vs-percent", r"\boxed{50}", r"50\%", 1.0),
    ("percent-no-backslash", r"\boxed{50%}", "50", 1.0),
    ("percent-vs-fraction", r"\boxed{7\%}", r"\frac{7}{100}", 1.0),  # math-verify accepts either reading of %
    ("wrong-percent", r"\boxed{40\%}", "50", 0.0),
    # --- degrees ---
    ("degrees-circ", r"\boxed{30^\circ}", "30", 1.0),
    ("degrees-braced-circ", r"\boxed{30^{\circ}}", "30", 1.0),
    ("degrees-unicode", r"\boxed{30°}", "30", 1.0),  # fixed in rewards.normalize_answer
    ("degrees-gold", r"\boxed{45}", r"45^\circ", 1.0),
    # math-verify: degrees are never converted to radians (convert_degrees=False); an answer in the other unit is
    # not what the problem asked for, so 0.0 is the grader's verdict too.
    ("degrees-vs-radians", r"\boxed{90^\circ}", r"\frac{\pi}{2}", 0.0),
    # --- units and \text{} ---
    ("units-text-cm", r"\boxed{5\text{ cm}}", "5", 1.0),
    ("units-text-space", r"\boxed{5 \text{cm}}", "5", 1.0),
    ("units-gold", r"\boxed{12}", r"12\text{ inches}", 1.0),
    ("units-whole-text", r"\boxed{\text{5 cm}}", "5", 1.0),  # fixed in rewards.normalize_answer
    ("dollars", r"\boxed{\$18.90}", "18.9", 1.0),
    ("text-answer", r"\boxed{\text{Monday}}", "Monday", 1.0),
    ("choice-letter", r"\boxed{\text{(C)}}", "C", 1.0),
    ("wrong-choice-letter", r"\boxed{B}", "C", 0.0),
    # --- thousands separators ---
    ("thousands-comma", r"\boxed{1,000}", "1000", 1.0),
    ("thousands-braced-comma", r"\boxed{1{,}000}", "1000", 1.0),
    ("thousands-thin-space", r"\boxed{1\,000}", "1000", 1.0),  # fixed in rewards.normalize_answer
    ("millions", r"\boxed{12,345,678}", "12345678", 1.0),
    # --- negative numbers ---
    ("negative", r"\boxed{-3}", "-3", 1.0),
    ("sign-error", r"\boxed{3}", "-3", 0.0),
    ("negative-fraction", r"\boxed{-0.5}", r"-\frac{1}{2}", 1.0),
    ("unicode-minus", r"\boxed{−5}", "-5", 1.0),
    # --- algebra ---
    ("expanded-vs-factored", r"\boxed{(x-1)(x+1)}", "x^2-1", 1.0),
    ("equation-rearranged", r"\boxed{y=1+2x}", "y = 2x + 1", 1.0),
    ("assignment-vs-value", r"\boxed{x = 5}", "5", 1.0),
    ("wrong-exponent", r"\boxed{x^3}", "x^2", 0.0),
    ("complex-commuted", r"\boxed{3i+2}", "2+3i", 1.0),
    ("integer-trailing-zeros", r"\boxed{10.0}", "10", 1.0),
    ("slightly-off", r"\boxed{5.0001}", "5", 0.0),
    # --- several boxes: the last one wins ---
    ("last-box-wins", r"First I got \boxed{3}. Wait, that is wrong: \boxed{4}.", "4", 1.0),
    ("earlier-box-ignored", r"First I got \boxed{3}. Wait, that is wrong: \boxed{4}.", "3", 0.0),
    ("nested-braces", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
    ("fbox", r"\fbox{7}", "7", 1.0),
    ("boxed-without-braces", r"so the answer is \boxed 7", "7", 1.0),
    # --- no box: fallbacks ---
    ("fallback-the-answer-is", "Adding them up, the answer is 7.", "7", 1.0),
    ("fallback-final-answer-colon", r"Final answer: $\frac{1}{2}$", "0.5", 1.0),
    ("fallback-minerva-style", "Final Answer: The final answer is $12$. I hope it is correct.", "12", 1.0),
    ("fallback-hash", "48 / 2 = 24 and 48 + 24 = 72.\n#### 72", "72", 1.0),
    ("fallback-trailing-math", r"Therefore $x = 3$.", "3", 1.0),
    ("fallback-display-math", "We conclude\n\\[ \\frac{3}{4} \\]", "0.75", 1.0),
    ("no-anchor-no-credit", "I think it's 5 or maybe 6, hard to say", "5", 0.0),
    ("fallback-wrong", "The answer is 8.", "7", 0.0),
    ("fallback-answer-with-units", "The answer is: 12 apples.", "12", 1.0),
    # --- malformed LaTeX and garbage: 0.0, never an exception ---
    ("unbalanced-last-box", r"\boxed{\frac{1}{2}", "0.5", 0.0),
    ("unbalanced-last-box-earlier-ok", r"\boxed{3} hmm \boxed{3", "3", 0.0),  # the last answer is broken
    ("empty-box", r"\boxed{}", "0", 0.0),
    ("garbage-braces", "}}}{{{", "5", 0.0),
    ("garbage-symbols", r"\boxed{@#$%^&}", "5", 0.0),
    ("broken-frac", r"\boxed{\frac{1}{}}", "1", 0.0),
    ("garbage-commands", r"\boxed{\foo\bar{\baz}}", "2", 0.0),
    # --- conversational format ---
    ("chat-correct", chat(r"The result is \boxed{42}."), "42", 1.0),
    ("chat-wrong", chat(r"The result is \boxed{41}."), "42", 0.0),
    (
        "chat-multi-message",
        [{"role": "user", "content": r"\boxed{1}"}, {"role": "assistant", "content": r"\boxed{2}"}],
        "2",
        1.0,
    ),
    # --- </think> handling ---
    ("think-final-after", r"<think>maybe \boxed{3}</think> The answer is \boxed{4}", "4", 1.0),
    ("think-box-inside-ignored", r"<think>maybe \boxed{3}</think> The answer is \boxed{4}", "3", 0.0),
    ("think-unterminated", r"<think>long reasoning ... \boxed{4}", "4", 0.0),
    ("think-close-only", r"reasoning \boxed{3} </think> Final: \boxed{4}", "4", 1.0),
    ("think-answer-only-inside", r"<think>\boxed{4}</think> I am done.", "4", 0.0),
    # --- gold answer formats ---
    ("gold-boxed", r"\boxed{5}", r"\boxed{5}", 1.0),
    (
        "gold-math-solution",
        r"\boxed{0.75}",
        r"Since $3/4$ of the cake is left, the answer is $\boxed{\frac{3}{4}}$.",
        1.0,
    ),
    ("gold-gsm8k", r"\boxed{1234}", "She earns 1000 + 234 = <<1000+234=1234>>1234.\n#### 1,234", 1.0),
    ("gold-dollar-delimited", r"\boxed{6}", "$6$", 1.0),
    ("gold-int", r"\boxed{204}", 204, 1.0),
    ("gold-list", r"\boxed{\{-1, 3\}}", ["3", "-1"], 1.0),
]


def test_table_is_large_enough():
    assert len(TABLE) >= 60
    assert len({row[0] for row in TABLE}) == len(TABLE), "row ids must be unique"


def test_reward_table(capsys):
    completions = [row[1] for row in TABLE]
    golds = [row[2] for row in TABLE]
    got = math_accuracy_reward(completions, golds)
    failures = [
        f"{row_id}: expected {expected}, got {reward} (completion={completion!r}, gold={gold!r})"
        for (row_id, completion, gold, expected), reward in zip(TABLE, got)
        if reward != expected
    ]
    passed = len(TABLE) - len(failures)
    with capsys.disabled():
        print(f"\nreward table: {passed}/{len(TABLE)} rows pass ({100.0 * passed / len(TABLE):.1f}%)")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------------------------------
# Extraction helpers.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{5}", "5"),
        (r"a \boxed{1} b \boxed{2} c", "2"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\left\{ x \right\}}", r"\left\{ x \right\}"),
        (r"\fbox{7}", "7"),
        (r"\boxed {8}", "8"),
        (r"\boxed 9.", "9."),
        (r"\boxed{}", ""),
        (r"\boxed{\frac{1}{2}", None),
        (r"\boxedfoo{3}", None),
        ("no box here", None),
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        ("1/2", "1/2"),
        (r"\frac{1}{2}", r"\frac{1}{2}"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"We find $x = 2$, so the answer is $\boxed{2}$.", "2"),
        ("3 + 4 = <<3+4=7>>7\n#### 7", "7"),
        ("$6$", "6"),
        (42, "42"),
        (27.0, "27"),
        (["$1$", "$2$"], "1, 2"),
        ("", None),
        (None, None),
    ],
)
def test_extract_gold_answer(solution, expected):
    assert extract_gold_answer(solution) == expected


def test_extract_final_answer_from_conversation_uses_last_assistant_message():
    conversation = [
        {"role": "assistant", "content": r"\boxed{1}"},
        {"role": "tool", "content": r"\boxed{2}"},
        {"role": "assistant", "content": r"\boxed{3}"},
    ]
    assert extract_final_answer(conversation) == "3"


# ----------------------------------------------------------------------------------------------------------------------
# Robustness: model output never raises; unusable gold answers give None.
# ----------------------------------------------------------------------------------------------------------------------

WEIRD_COMPLETIONS = [
    None,
    "",
    "   ",
    [],
    [{"role": "assistant", "content": None}],
    [{"role": "assistant"}],
    [{"role": "assistant", "content": [{"type": "text", "text": r"\boxed{5}"}]}],
    {"content": r"\boxed{5}"},
    12345,
    ["not a message"],
    "\\boxed{" * 2000,
    "}" * 5000 + r"\boxed{5",
    "x" * 1_000_000,
    r"\boxed{" + "1+" * 5000 + "1}",
    "$" * 3001,
    "\\" * 3001,
    "\x00\ud800 \\boxed{\x00}",
]


def test_never_raises_on_weird_completions():
    start = time.monotonic()
    got = math_accuracy_reward(WEIRD_COMPLETIONS, ["5"] * len(WEIRD_COMPLETIONS))
    assert len(got) == len(WEIRD_COMPLETIONS)
    assert all(reward in (0.0, 1.0) for reward in got)
    assert got[6] == 1.0 and got[7] == 1.0  # multimodal content parts and a bare message dict are read
    assert sum(got) == 2.0
    assert time.monotonic() - start < 15


def test_unparseable_gold_gives_none_and_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(rewards, "_warned_unparseable_gold", False)
    completions = [r"\boxed{1}", r"\boxed{1}", r"\boxed{1}", r"\boxed{1}", r"\boxed{1}"]
    with caplog.at_level("WARNING", logger="gnivo_trl.rewards"):
        got = math_accuracy_reward(completions, [r"\frac{1}{", "@@@", "", None, "1"])
        math_accuracy_reward([r"\boxed{1}"], ["@@@"])
    assert got == [None, None, None, None, 1.0]
    warnings = [r for r in caplog.records if r.name == "gnivo_trl.rewards" and "could not be parsed" in r.message]
    assert len(warnings) == 1


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        math_accuracy_reward(["a", "b"], ["1"])


def test_overlong_answer_scores_zero_without_parsing(monkeypatch):
    monkeypatch.setattr(rewards, "MAX_ANSWER_CHARS", 10)
    assert math_accuracy_reward([r"\boxed{1+1+1+1+1+1+1}", r"\boxed{7}"], ["7", "7"]) == [0.0, 1.0]


def test_log_extra_receives_extracted_answers():
    logged = {}
    math_accuracy_reward(
        [r"\boxed{3}", "nothing"], ["3", "4"], log_extra=lambda column, values: logged.update({column: values})
    )
    assert logged == {"math_answer": ["3", ""]}


def test_missing_math_verify_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "math_verify", None)
    with pytest.raises(ImportError, match=r"pip install gnivo-trl\[math\]"):
        math_accuracy_reward([r"\boxed{1}"], ["1"])


# ----------------------------------------------------------------------------------------------------------------------
# Time bound.
# ----------------------------------------------------------------------------------------------------------------------

PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"  # sympy would try to evaluate a number with ~10^(3.7 10^8) digits


def test_pathological_answer_returns_within_the_bound():
    start = time.monotonic()
    assert math_accuracy_reward([PATHOLOGICAL], ["5"]) == [0.0]
    elapsed = time.monotonic() - start
    assert elapsed < rewards.PARSING_TIMEOUT_SECONDS + rewards.VERIFY_TIMEOUT_SECONDS + 1.0


def test_off_main_thread_scores_in_a_child_with_the_same_bound(monkeypatch):
    monkeypatch.setattr(rewards, "PARSING_TIMEOUT_SECONDS", 1)
    monkeypatch.setattr(rewards, "VERIFY_TIMEOUT_SECONDS", 1)
    result = {}

    def score():
        start = time.monotonic()
        result["rewards"] = math_accuracy_reward(
            [PATHOLOGICAL, r"\boxed{0.5}", "no answer", r"\boxed{2}"], ["5", r"\frac{1}{2}", "1", "@@@"]
        )
        result["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert result["rewards"] == [0.0, 1.0, 0.0, None]
    assert result["elapsed"] < 15  # child start-up (imports sympy) plus about 2 s for the pathological answer


def test_child_failure_scores_the_batch_zero(monkeypatch):
    monkeypatch.setattr(rewards.sys, "executable", "/nonexistent/python")
    got = rewards._score_answers_in_child(["1", None], ["1", None], 1, 1)
    assert got == [0.0, None]


# ----------------------------------------------------------------------------------------------------------------------
# format_reward.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"So \boxed{5}.", 1.0),
        (chat(r"So \boxed{5}."), 1.0),
        (r"\boxed{4} then \boxed{5}", 0.0),
        (r"no box", 0.0),
        (r"\boxed{}", 0.0),
        (r"\boxed{5", 0.0),
        (r"<think>\boxed{3}</think> \boxed{5}", 1.0),
        (r"<think>\boxed{3}</think> done", 0.0),
        (r"<think>\boxed{3}", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


# ----------------------------------------------------------------------------------------------------------------------
# NoisyReward
# ----------------------------------------------------------------------------------------------------------------------


class _State:
    def __init__(self, step: int) -> None:
        self.global_step = step


def _constant(value):
    def reward(completions, **kwargs):
        return [value] * len(completions)

    return reward


def _naive_draw(seed: int, step: int, key: str) -> float:
    """The authors' draw, written out: blake2b of "seed:step:key", 8 bytes little-endian, over 2**64."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / float(2**64)


def _flipped(noisy, step: int, count: int, **kwargs) -> list[bool]:
    """Which of ``count`` rewards of 1.0 a wrapper flips at ``step``."""
    return [r == 0.0 for r in noisy(["x"] * count, trainer_state=_State(step), **kwargs)]


def test_noisy_reward_group_flips_whole_groups_at_the_rate():
    k, groups, steps = 8, 8, 400
    noisy = rewards.NoisyReward(_constant(1.0), 0.25, mode="group", num_generations=k, seed=10)
    decisions = []
    for step in range(steps):
        flips = _flipped(noisy, step, k * groups)
        for g in range(groups):
            members = flips[g * k : (g + 1) * k]
            assert len(set(members)) == 1  # all of a group's rewards flip, or none
            decisions.append(members[0])
    n = steps * groups
    # 3,200 Bernoulli(0.25) group decisions: the realised share is within 4 standard deviations of p.
    assert abs(sum(decisions) / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    stats = noisy.stats()
    assert stats["groups"] == n and stats["groups_flipped"] == sum(decisions)
    assert stats["scored"] == n * k and stats["flipped"] == k * sum(decisions)
    assert stats["flip_rate"] == pytest.approx(sum(decisions) / n)


def test_noisy_reward_independent_flips_at_the_rate_and_within_groups():
    k, steps = 8, 200
    noisy = rewards.NoisyReward(_constant(1.0), 0.25, mode="independent", num_generations=k, seed=10)
    flips = [_flipped(noisy, step, 64) for step in range(steps)]
    total = sum(map(sum, flips))
    assert abs(total / (64 * steps) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / (64 * steps))
    mixed = sum(len(set(f[g * k : (g + 1) * k])) == 2 for f in flips for g in range(8))
    assert mixed > 0.8 * 8 * steps  # 1 - 0.75**8 - 0.25**8 = 90% of groups have flipped and kept rewards
    assert noisy.stats()["groups_flipped"] == 0


@pytest.mark.parametrize("mode", rewards.NOISE_MODES)
def test_noisy_reward_draws_are_the_authors_hash_of_seed_step_and_group(mode):
    k, seed = 4, 7
    noisy = rewards.NoisyReward(_constant(1.0), 0.4, mode=mode, num_generations=k, seed=seed)
    for step in (0, 1, 13):
        expected = [
            _naive_draw(seed, step, str(i // k) if mode == "group" else f"{i // k}/{i % k}") < 0.4 for i in range(24)
        ]
        assert _flipped(noisy, step, 24) == expected


@pytest.mark.parametrize("mode", rewards.NOISE_MODES)
def test_noisy_reward_is_deterministic_and_common_to_every_method_at_a_seed(mode):
    def flips_of(reward_func, seed, p=0.25):
        noisy = rewards.NoisyReward(reward_func, p, mode=mode, num_generations=8, seed=seed)
        out = []
        for step in range(20):
            clean = reward_func(["x"] * 64, step=step)
            noisy_rewards = noisy(["x"] * 64, trainer_state=_State(step), step=step)
            out.append([a != b for a, b in zip(clean, noisy_rewards)])
        return out

    def policy_a(completions, step, **kwargs):  # two "methods": different rewards for the same prompts
        return [float((i + step) % 3 == 0) for i in range(len(completions))]

    def policy_b(completions, step, **kwargs):
        return [float((i * step) % 2 == 0) for i in range(len(completions))]

    assert flips_of(policy_a, 10) == flips_of(policy_b, 10)  # the same positions flipped, whatever the rewards
    assert flips_of(policy_a, 10) == flips_of(policy_a, 10)
    assert flips_of(policy_a, 10) != flips_of(policy_a, 11)  # another seed, another pattern
    first = flips_of(policy_a, 10)
    assert first[0] != first[1]  # another step, another pattern
    small, large = flips_of(policy_a, 10, 0.1), flips_of(policy_a, 10, 0.4)
    assert all(not a or b for row_a, row_b in zip(small, large) for a, b in zip(row_a, row_b))  # a superset


def test_noisy_reward_keeps_none_and_nan_and_flips_the_rest_of_a_group():
    values = [None, 1.0, 0.0, True, math.nan, 0, 1, False]
    noisy = rewards.NoisyReward(lambda completions, **kw: values, 1.0, mode="group", num_generations=4)
    out = noisy(["x"] * 8, trainer_state=_State(0))
    assert out[0] is None and math.isnan(out[4])
    assert [out[i] for i in (1, 2, 3, 5, 6, 7)] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert noisy.stats()["scored"] == 6 and noisy.stats()["flipped"] == 6
    kept = rewards.NoisyReward(lambda completions, **kw: values, 0.0, mode="independent", num_generations=4)
    out = kept(["x"] * 8, trainer_state=_State(0))
    assert out[0] is None and [out[i] for i in (1, 2, 3, 5, 6, 7)] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
def test_noisy_reward_refuses_non_binary_rewards(value):
    noisy = rewards.NoisyReward(_constant(value), 0.25, num_generations=2)
    with pytest.raises(ValueError, match="flips 0/1 rewards"):
        noisy(["x", "y"], trainer_state=_State(0))


def test_noisy_reward_refuses_bad_settings_and_calls_without_a_step():
    with pytest.raises(ValueError, match="flip_probability=1.5"):
        rewards.NoisyReward(_constant(1.0), 1.5, num_generations=2)
    with pytest.raises(ValueError, match="mode='prompt'"):
        rewards.NoisyReward(_constant(1.0), 0.1, mode="prompt", num_generations=2)
    with pytest.raises(ValueError, match="num_generations=0"):
        rewards.NoisyReward(_constant(1.0), 0.1, num_generations=0)

    async def async_reward(completions, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(TypeError, match="synchronous"):
        rewards.NoisyReward(async_reward, 0.1, num_generations=2)
    with pytest.raises(ValueError, match="trainer_state"):
        rewards.NoisyReward(_constant(1.0), 0.1, num_generations=2)(["x", "y"])


def test_noisy_reward_checks_that_a_group_shares_its_prompt():
    prompts = ["a"] * 4 + ["b"] * 4
    right = rewards.NoisyReward(_constant(1.0), 0.5, num_generations=4)
    right(["x"] * 8, prompts=prompts, trainer_state=_State(0))
    wrong = rewards.NoisyReward(_constant(1.0), 0.5, num_generations=8)  # not the trainer's K
    with pytest.raises(ValueError, match="num_generations=8 is not the trainer's"):
        wrong(["x"] * 8, prompts=prompts, trainer_state=_State(0))


def test_noisy_reward_passes_every_argument_on_and_logs_its_flip_rate():
    seen, logged = {}, {}

    def reward(completions, prompts, trainer_state, solution, **kwargs):
        seen.update(prompts=prompts, step=trainer_state.global_step, solution=solution)
        return [1.0] * len(completions)

    noisy = rewards.NoisyReward(reward, 1.0, num_generations=2)
    assert noisy.__name__ == "reward"  # TRL logs the reward under the wrapped function's name
    noisy(
        completions=["x", "y"],
        prompts=["p", "p"],
        solution=["1", "1"],
        trainer_state=_State(5),
        log_metric=lambda name, value: logged.update({name: value}),
    )
    assert seen == dict(prompts=["p", "p"], step=5, solution=["1", "1"])
    assert logged == {"reward_noise/reward/flip_rate": 1.0}


@pytest.mark.parametrize("mode", rewards.NOISE_MODES)
@pytest.mark.parametrize("per_process", [6, 8, 12])
def test_noisy_reward_finds_each_group_on_every_process(monkeypatch, mode, per_process):
    """TRL hands process r the rows [r * n, (r + 1) * n) of the generation batch; with n = 6 and K = 4 group 1 is
    split between processes 0 and 1. Each process's slice must come out as that slice of the one-process result."""
    k, processes, p = 4, 2, 0.5
    values = [float(i % 3 == 0) for i in range(per_process * processes)]
    prompts = [f"prompt {i // k}" for i in range(per_process * processes)]

    def reward(completions, offset, **kwargs):
        return values[offset : offset + len(completions)]

    for step in range(6):
        one = rewards.NoisyReward(reward, p, mode=mode, num_generations=k, seed=1)
        monkeypatch.setattr(rewards, "_process_index", lambda: 0)
        whole = one(["x"] * len(values), prompts=prompts, offset=0, trainer_state=_State(step))
        parts = []
        for rank in range(processes):
            monkeypatch.setattr(rewards, "_process_index", lambda rank=rank: rank)
            local = slice(rank * per_process, (rank + 1) * per_process)
            wrapper = rewards.NoisyReward(reward, p, mode=mode, num_generations=k, seed=1)
            parts += wrapper(
                ["x"] * per_process, prompts=prompts[local], offset=local.start, trainer_state=_State(step)
            )
        assert parts == whole


@pytest.mark.slow
def test_noisy_reward_flips_trl_groups_on_one_and_on_two_processes(tiny_model_dir, tmp_path):
    """GRPOTrainer on one process (12 rows) and on two gloo processes (6 rows each, so the second of the three
    groups of 4 is split between them): in the rewards TRL gathers, every group's rows are all flipped or all kept,
    exactly as the draw for (seed, step, group) says, in both layouts."""
    import subprocess
    import sys

    import torch
    from conftest import torchrun_two_processes

    script = str(Path(__file__).parent / "noisy_reward_layout.py")
    layouts = {"one": ([sys.executable], 12), "two": (torchrun_two_processes(), 6)}
    saved = {}
    for name, (launcher, per_device) in layouts.items():
        out = tmp_path / name / "gathered.pt"
        out.parent.mkdir()
        done = subprocess.run(
            [*launcher, script, tiny_model_dir, str(out), str(per_device)], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        saved[name] = torch.load(out)
    k, p, seed = 4, 0.5, 3
    patterns = {}
    for name, record in saved.items():
        assert [step for step, _ in record["gathered"]] == [0, 1, 2, 3]
        pattern = []
        for step, gathered in record["gathered"]:
            assert gathered.shape == (12, 2)
            flipped = (gathered[:, 0] != gathered[:, 1]).view(-1, k)  # TRL's groups: consecutive rows of K
            assert torch.equal(gathered[:, 0], torch.where(flipped.flatten(), 1 - gathered[:, 1], gathered[:, 1]))
            for g in range(3):
                assert flipped[g].all() or not flipped[g].any()
                assert bool(flipped[g, 0]) == (_naive_draw(seed, step, str(g)) < p)
            pattern.append(flipped[:, 0].tolist())
        patterns[name] = pattern
    assert patterns["one"] == patterns["two"]
    split_group = [step_pattern[1] for step_pattern in patterns["two"]]
    assert True in split_group and False in split_group  # the split group was flipped at some step and kept at another
