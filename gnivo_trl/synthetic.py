"""A procedurally generated multi-step reasoning task with an exact verifier, and a warm start that half-solves it.

Nobody can download a pretrained model here, and a randomly initialised tiny model cannot show that an RL algorithm
works: it solves nothing, so every group's rewards are equal and no algorithm has a signal. This module provides what
a pretrained model would: a task with several reasoning steps and an exact verifier, and a small Qwen2-architecture
model fine-tuned (TRL's `SFTTrainer`) to partial skill, so that RL has something to improve.

**The task: chained arithmetic mod 10.** A problem is a start digit followed by `num_steps` operations, evaluated
left to right modulo 10 (no precedence), e.g. `3+4*2-5`. The solution takes one line per step, steps separated by
`"\\n\\n"` (so `GNIVOConfig(gnivo_prefix_unit="step")` sees them), and ends with the boxed answer:

```text
3+4=7

7*2=4

4-5=9

\\boxed{9}
```

**Verifier.** `chain_reward` scores 1.0 only when the completion reproduces every step exactly and boxes the
right answer; a corrupted step (even one whose error is later undone) or a wrong answer scores 0.0.

**Splits.** Whether a problem belongs to the test split is a fixed function of its text (a SHA-256 hash), so the
train and test splits are disjoint by construction whatever the seeds, and each is a deterministic function of
`(seed, num_steps)`.

**Tokenizer.** One token per byte (a byte-level BPE without merges; the task's text is ASCII, so one token per
character), plus ChatML specials and `\\boxed{` and the role names as single tokens, with the ChatML chat template
of `gnivo_trl.testing`: 265 tokens, so the model stays tiny and fast on CPU.

**Warm start.** `build_warm_start` fine-tunes a randomly initialised model on reference solutions of train
problems, a share of which carry injected step errors (a wrong result, carried consistently into the following
steps). The model therefore learns a *noisy* solver: at temperature 1 it makes step errors at about the injected
rate, and solves a moderate fraction of test problems. RL must sharpen it towards the correct steps. The result is
cached on disk (default `~/.cache/gnivo-trl/`) under a name that encodes every setting, and rebuilt
deterministically (seeded) when missing.

Examples:
    ```python
    from gnivo_trl import GNIVOConfig, GNIVOTrainer
    from gnivo_trl.synthetic import build_warm_start, chain_reward, make_rl_dataset

    model_dir = build_warm_start()  # minutes on 2 CPU cores the first time, then cached
    train = make_rl_dataset(512, split="train")  # prompt (chat messages), problem, answer
    args = GNIVOConfig(output_dir="synthetic", gnivo_prefix_unit="step", use_cpu=True, bf16=False)
    trainer = GNIVOTrainer(model=model_dir, reward_funcs=chain_reward, args=args, train_dataset=train)
    ```
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerCallback

from .testing import SPECIAL_TOKENS, build_tiny_model, chatml_tokenizer

__all__ = [
    "AccuracyCallback",
    "OPERATIONS",
    "WarmStartConfig",
    "apply_operation",
    "build_tokenizer",
    "build_warm_start",
    "chain_reward",
    "completion_text",
    "default_cache_dir",
    "earliest_wrong_step",
    "evaluate_accuracy",
    "final_answer",
    "generate_problems",
    "is_test_problem",
    "make_rl_dataset",
    "make_sft_dataset",
    "solution_text",
    "verify",
]

OPERATIONS = ("+", "-", "*")
STEP_DELIMITER = "\n\n"
BOXED = "\\boxed{"
# One in TEST_MODULUS problems (by hash of the text) belongs to the test split.
TEST_MODULUS = 5


# --------------------------------------------------------------------------------------------------------------------
# Problems, solutions and the verifier
# --------------------------------------------------------------------------------------------------------------------


def apply_operation(value: int, operation: str, operand: int) -> int:
    """One step of the chain: `value operation operand` modulo 10."""
    if operation == "+":
        return (value + operand) % 10
    if operation == "-":
        return (value - operand) % 10
    if operation == "*":
        return (value * operand) % 10
    raise ValueError(f"Unknown operation {operation!r}; expected one of {OPERATIONS}.")


def _parse(problem: str) -> tuple[int, list[tuple[str, int]]]:
    """`"3+4*2"` -> `(3, [("+", 4), ("*", 2)])`."""
    if len(problem) < 3 or len(problem) % 2 == 0 or not problem[0].isdigit():
        raise ValueError(f"Not a chained-arithmetic problem: {problem!r}")
    steps = [(problem[i], int(problem[i + 1])) for i in range(1, len(problem), 2)]
    if any(op not in OPERATIONS for op, _ in steps):
        raise ValueError(f"Not a chained-arithmetic problem: {problem!r}")
    return int(problem[0]), steps


def is_test_problem(problem: str) -> bool:
    """Whether `problem` belongs to the test split: a fixed function of its text, so the splits never overlap."""
    return hashlib.sha256(problem.encode()).digest()[0] % TEST_MODULUS == 0


def generate_problems(num_problems: int, split: str = "train", num_steps: int = 4, seed: int = 0) -> list[str]:
    """`num_problems` distinct problems of `num_steps` operations from `split` ("train" or "test").

    Deterministic in `(num_problems, split, num_steps, seed)`; a larger `num_problems` extends a smaller one's
    list. The difficulty knob is `num_steps` (there are `10 * 30**num_steps` problems in all, a fifth of them in
    the test split).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    # About 1/TEST_MODULUS of all problems are test problems; asking for more than half of a split's problems would
    # make the rejection sampling below crawl.
    available = 10 * 30**num_steps // (TEST_MODULUS if split == "test" else 1)
    if num_problems > available // 2:
        raise ValueError(
            f"Asked for {num_problems} problems; with num_steps={num_steps} use at most {available // 2}."
        )
    # The split's name and the difficulty are part of the seed, so the train and test streams are unrelated.
    rng = random.Random(f"gnivo-trl-synthetic/{split}/{num_steps}/{seed}")
    problems: list[str] = []
    seen: set[str] = set()
    want_test = split == "test"
    while len(problems) < num_problems:
        text = str(rng.randrange(10)) + "".join(
            rng.choice(OPERATIONS) + str(rng.randrange(10)) for _ in range(num_steps)
        )
        if text in seen or is_test_problem(text) != want_test:
            continue
        seen.add(text)
        problems.append(text)
    return problems


def solution_text(problem: str, error_steps: Sequence[int] = (), rng: random.Random | None = None) -> str:
    """The step-by-step solution of `problem`; with `error_steps`, those steps (0-based) get a wrong result.

    A wrong result is a uniformly drawn different digit, carried consistently into the following steps (a student
    who slips keeps computing from the slip), so the final answer is usually wrong too.
    """
    value, steps = _parse(problem)
    rng = rng or random.Random(0)
    lines = []
    for index, (operation, operand) in enumerate(steps):
        result = apply_operation(value, operation, operand)
        if index in error_steps:
            result = (result + rng.randrange(1, 10)) % 10
        lines.append(f"{value}{operation}{operand}={result}")
        value = result
    return STEP_DELIMITER.join([*lines, f"{BOXED}{value}}}"])


def final_answer(problem: str) -> str:
    """The correct final digit of `problem`, as a string."""
    value, steps = _parse(problem)
    for operation, operand in steps:
        value = apply_operation(value, operation, operand)
    return str(value)


def completion_text(completion: str | list[dict]) -> str:
    """The text of a plain (string) or conversational (list of messages) completion."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion if message.get("role", "assistant") == "assistant")


def verify(problem: str, completion: str, answer: str | None = None) -> bool:
    """Exact check: every step of `completion` is the correct one and the boxed answer is right.

    Surrounding whitespace is ignored; anything else (a wrong step result, a wrong operand, a missing or extra step,
    text after the boxed answer) fails. `answer`, when given, must equal the correct final digit as well.
    """
    reference = solution_text(problem)
    if answer is not None and str(answer).strip() != final_answer(problem):
        return False
    return completion.strip() == reference


def earliest_wrong_step(problem: str, completion: str) -> int | None:
    """Index of the first wrong step of `completion` (0-based), or None when `verify` accepts it.

    The label of ProcessBench ("where did it go wrong?") for this task. Steps are the pieces of `completion` split
    at `STEP_DELIMITER`, exactly the units of `GNIVOConfig(gnivo_prefix_unit="step")`: piece `k` is unit
    `k` (the delimiter closes the piece before it), and the boxed answer is the last step (index `num_steps` of a
    complete solution). A piece is wrong when it differs from the reference solution's piece at the same index (a
    wrong result, a wrong operand, or a piece beyond the reference's last); surrounding whitespace of the whole
    completion is ignored, as `verify` ignores it. Steps after the first wrong one are not judged: a slip is
    carried into the next lines, which are then "wrong" only because of it. A completion that is a strict prefix of
    the reference (it stopped early) went wrong at its last piece, where it stopped instead of going on.

    Consistent with `verify`: None exactly when `verify(problem, completion)` is True.
    """
    if verify(problem, completion):
        return None
    reference = solution_text(problem).split(STEP_DELIMITER)
    pieces = completion.split(STEP_DELIMITER)
    for index, piece in enumerate(pieces):
        # Only the whole completion's surrounding whitespace is forgiven (verify strips it), not a piece's own.
        text = piece.lstrip() if index == 0 else piece
        text = text.rstrip() if index == len(pieces) - 1 else text
        if index >= len(reference) or text != reference[index]:
            return index
    return len(pieces) - 1


def chain_reward(
    completions: list, problem: list[str], answer: list[str] | None = None, **kwargs
) -> list[float | None]:
    """Exact-match reward in TRL's reward-function convention: 1.0 for a fully correct solution, else 0.0.

    Args:
        completions: Plain strings or conversational completions (lists of `{"role", "content"}` messages).
        problem: The `problem` column of the dataset (e.g. `"3+4*2-5"`): every step is checked against it.
        answer: The `answer` column (the correct final digit), cross-checked when present.
    """
    answers = answer if answer is not None else [None] * len(completions)
    return [
        1.0 if verify(p, completion_text(c), a) else 0.0 for c, p, a in zip(completions, problem, answers, strict=True)
    ]


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and datasets
# --------------------------------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ChatML specials and chat template (`<|im_end|>` is EOS, left padding).

    Every byte is one token (the task's text is ASCII, so one token per character), and `\\boxed{` and the chat
    roles are one token each: a 4-step solution is 31 tokens plus EOS, and the vocabulary has 265 entries.
    """
    # A byte-level BPE with no merges: one token per byte (every text round-trips). Byte-level rather than a plain
    # character vocabulary because transformers 5's AutoTokenizer loads a saved Qwen2 checkpoint's tokenizer as
    # Qwen2Tokenizer, which imposes byte-level pre-tokenization: with no merges that gives exactly the same tokens.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = chatml_tokenizer(backend)
    # Whole tokens for the chat template's role names and the answer box: shorter sequences, faster training.
    tokenizer.add_tokens([BOXED, "user", "assistant", "system"])
    return tokenizer


def _prompt(problem: str, conversational: bool):
    return [{"role": "user", "content": problem}] if conversational else problem


def make_rl_dataset(
    num_problems: int, split: str = "train", num_steps: int = 4, seed: int = 0, conversational: bool = True
):
    """A `datasets.Dataset` for RL: `prompt` (chat messages or plain text), `problem` and `answer` columns."""
    from datasets import Dataset

    problems = generate_problems(num_problems, split=split, num_steps=num_steps, seed=seed)
    return Dataset.from_dict(
        {
            "prompt": [_prompt(p, conversational) for p in problems],
            "problem": problems,
            "answer": [final_answer(p) for p in problems],
        }
    )


def make_sft_dataset(
    num_examples: int, num_steps: int = 4, error_rate: float = 0.15, seed: int = 0, problem_seed: int = 1000
):
    """Conversational prompt-completion pairs for `SFTTrainer`: train problems with noisy reference solutions.

    Each step of each solution is independently corrupted with probability `error_rate`, so the fine-tuned model
    learns to slip at about that rate. Problems come from the train split only, drawn with `problem_seed` (distinct
    from the RL prompts' default seed 0, though the two streams may share a few problems: the split is what matters).
    """
    from datasets import Dataset

    rng = random.Random(f"gnivo-trl-synthetic/sft-errors/{seed}")
    problems = generate_problems(num_examples, split="train", num_steps=num_steps, seed=problem_seed + seed)
    completions = []
    for problem in problems:
        errors = [step for step in range(num_steps) if rng.random() < error_rate]
        completions.append(solution_text(problem, errors, rng))
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in problems],
            "completion": [[{"role": "assistant", "content": c}] for c in completions],
        }
    )


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_accuracy(
    model,
    tokenizer,
    problems: Sequence[str],
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
) -> float:
    """Share of `problems` solved exactly by one sample each (temperature 1 by default; 0 means greedy).

    Seeded, so two models evaluated with the same `seed` see the same random stream; the model's training mode
    and the global torch RNG state are restored afterwards (evaluation inside a training run must not perturb it).
    """
    was_training = model.training
    model.eval()
    rng_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)  # seeds the CUDA generators too
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(solution_text(p))["input_ids"]) for p in problems) + 4
    correct = 0
    try:
        for start in range(0, len(problems), batch_size):
            chunk = list(problems[start : start + batch_size])
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in chunk
            ]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            decoded = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(verify(p, text) for p, text in zip(chunk, decoded, strict=True))
    finally:
        torch.set_rng_state(rng_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        model.train(was_training)
    return correct / len(problems)


# --------------------------------------------------------------------------------------------------------------------
# Warm start
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmStartConfig:
    """Everything that determines the warm-start model; the cache directory's name is a hash of it.

    The defaults fine-tune a ~0.1M-parameter Qwen2 model (hidden 64, 2 layers) for 1,500 steps of 64 examples: a few
    minutes on one CPU core. At temperature 1 it then slips on about `error_rate` of the steps, so it solves about
    `(1 - error_rate) ** num_steps` of the problems (41% for the defaults) and RL has room to improve.
    """

    num_steps: int = 4
    error_rate: float = 0.2
    num_examples: int = 24_000
    epochs: float = 4.0
    batch_size: int = 64
    learning_rate: float = 3e-3
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    seed: int = 0
    version: int = 2  # bump when the task or the recipe changes, so stale caches are not reused

    def key(self) -> str:
        """A short stable hash of every field, used as the cache directory name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """`$GNIVO_TRL_CACHE` if set, else `$XDG_CACHE_HOME/gnivo-trl` (`~/.cache/gnivo-trl`)."""
    if os.environ.get("GNIVO_TRL_CACHE"):
        return Path(os.environ["GNIVO_TRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gnivo-trl"


WARM_START_MARKER = "warm_start.json"  # written last into a warm start's directory: the build finished


def warm_start_directory(prefix: str, config, cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir / f"{prefix}-{config.key()}"` (default cache dir: `default_cache_dir`)."""
    return Path(cache_dir or default_cache_dir()) / f"{prefix}-{config.key()}"


def tiny_model_of(config, tokenizer, max_position_embeddings: int):
    """The randomly initialised model of a warm-start config's shape and seed (`build_tiny_model`)."""
    return build_tiny_model(
        tokenizer,
        seed=config.seed,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
    )


def build_warm_start(
    config: WarmStartConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    verbose: bool = True,
) -> str:
    """The directory of the warm-started model (tokenizer included), fine-tuning it first if it is not cached.

    The model is written to `cache_dir / f"synthetic-warm-start-{config.key()}"` (default cache dir: see
    `default_cache_dir`); a finished build leaves a `warm_start.json` there, so an interrupted one is redone.
    Building is deterministic given the config on a given device (seeded data, initialisation and data order).
    """
    config = config or WarmStartConfig()
    directory = warm_start_directory("synthetic-warm-start", config, cache_dir)
    if (directory / WARM_START_MARKER).exists() and not force:
        return str(directory)

    tokenizer = build_tokenizer()
    model = tiny_model_of(config, tokenizer, max_position_embeddings=128)
    dataset = make_sft_dataset(
        config.num_examples, num_steps=config.num_steps, error_rate=config.error_rate, seed=config.seed
    )

    def check(model, tokenizer) -> dict:
        problems = generate_problems(256, "test", config.num_steps, seed=1)
        return {"test_accuracy_t1_256": evaluate_accuracy(model, tokenizer, problems)}

    info = fine_tune_into_cache(
        directory, model, tokenizer, dataset, config, max_length=128, label="warm start", check=check, verbose=verbose
    )
    if verbose:
        print(
            f"Warm start ready in {info['seconds']:.0f} s: solves {info['test_accuracy_t1_256']:.0%} of 256 test "
            "problems (one sample each at temperature 1).",
            flush=True,
        )
    return str(directory)


def fine_tune_into_cache(
    directory: Path,
    model,
    tokenizer,
    dataset,
    config,
    max_length: int,
    label: str,
    check,
    verbose: bool = True,
) -> dict:
    """The warm-start recipe shared by this module and `gnivo_trl.agent_task`: fine-tune `model` with TRL's
    `SFTTrainer` and cache it in `directory`.

    `config` supplies `epochs`, `num_examples`, `batch_size`, `learning_rate` and `seed` (AdamW, cosine
    schedule with 5% warm-up, seeded data order). The model and tokenizer are written to `directory` + `.tmp`,
    then `check(model, tokenizer) -> dict` measures the result, and `warm_start.json` (`config`, `seconds`,
    `sft_seconds` and `check`'s entries) marks the build finished before the rename to `directory`, so an
    interrupted build is redone. Returns that json's contents.
    """
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    total_steps = max(int(config.epochs * config.num_examples / config.batch_size), 1)

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if verbose and logs and "loss" in logs:
                print(
                    f"  {label}: step {state.global_step:>4}/{total_steps}  loss {logs['loss']:.3f}  "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )

    if verbose:
        print(
            f"Building the {label} ({sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{total_steps} SFT steps of {config.batch_size}) in {directory} ...",
            flush=True,
        )
    work = directory.with_name(directory.name + ".tmp")
    args = SFTConfig(
        output_dir=str(work / "sft"),
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,  # SFTConfig turns it on by default; on a tiny CPU model it only costs time
        per_device_train_batch_size=config.batch_size,
        max_steps=total_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(total_steps // 20, 1),
        weight_decay=0.0,
        max_length=max_length,
        logging_steps=max(total_steps // 10, 1),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[_Progress()]
    )
    trainer.remove_callback(PrinterCallback)  # _Progress prints a shorter line
    trainer.train()
    shutil.rmtree(work / "sft", ignore_errors=True)
    model = trainer.model
    model.generation_config.do_sample = True
    work.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    sft_seconds = time.perf_counter() - started
    measured = check(model, tokenizer)
    info = {"config": asdict(config), "seconds": time.perf_counter() - started, "sft_seconds": sft_seconds, **measured}
    (work / WARM_START_MARKER).write_text(json.dumps(info, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    work.rename(directory)
    return info


class AccuracyCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that measures test accuracy before training and every `every` steps.

    `history` collects `(step, accuracy)`; `eval_seconds` the time spent evaluating (so wall times can be
    reported with and without it). Every evaluation uses the same `seed`, so all methods and all checkpoints see
    the same random stream on the same problems (common random numbers: differences are less noisy).
    """

    def __init__(
        self,
        tokenizer,
        problems: Sequence[str],
        every: int,
        seed: int = 0,
        verbose: bool = False,
        label: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.problems = list(problems)
        self.every = every
        self.seed = seed
        self.verbose = verbose
        self.label = label
        self.history: list[tuple[int, float]] = []
        self.eval_seconds = 0.0

    def _evaluate(self, step: int, model) -> None:
        started = time.perf_counter()
        accuracy = evaluate_accuracy(model, self.tokenizer, self.problems, seed=self.seed)
        self.eval_seconds += time.perf_counter() - started
        self.history.append((step, accuracy))
        if self.verbose:
            print(f"  {self.label}step {step:>4}: test accuracy {accuracy:.3f}", flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.history or self.history[-1][0] != state.global_step:
            self._evaluate(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._evaluate(state.global_step, model)
