"""Run the Python code blocks of the README, the docs pages and the public docstrings offline, as a reader would.

A documented snippet that breaks is a red build. The snippets are written for real models and datasets on the Hub;
the test suite runs offline on CPU. One mechanism bridges the two, and it is this module:

* :data:`HUB_STAND_INS` maps every Hub model and dataset id the documentation uses to an offline stand-in. Before a
  block runs, every quoted occurrence of such an id in its source is replaced by the stand-in's local path. Every
  source in `gnivo_trl.data.DATASETS` whose Hub id is in the table reads the stand-in file instead, so
  `load_math_dataset("math")` works unchanged. An id that is not in the table reaches the Hub client, which is
  offline in the tests, and the block fails.
* The warm starts of the synthetic tasks (`gnivo_trl.synthetic.build_warm_start`,
  `gnivo_trl.agent_task.build_tool_warm_start`: minutes of SFT) return the tiny stand-ins' directories instead.
* Training is capped so that a block that says `trainer.train()` finishes in seconds: every `GRPOConfig` (and so
  `GNIVOConfig` and `VIMPOConfig`) gets `max_steps=1`, `max_completion_length <= 16`, CPU without bf16, no
  gradient checkpointing, no saving and no reporting. `Trainer.push_to_hub` saves the model and its card locally
  instead of uploading them. `Trainer.train` must then take at least one optimizer step.

Nothing else in a block is changed. The blocks of one page run in order in one namespace (a reader runs them one
after the other); each docstring's examples run in a fresh namespace. The docstrings are those of every public module of the
package (the API reference renders some of them; a reader of the source reads all of them), and
:func:`fence_problems` refuses a fence that would hide an example from both the reader and this test.
docs/development.md documents this.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "datasets"

# Stand-in kinds: "tiny" is gnivo_trl.testing.save_tiny_model (a ChatML template), "tiny-run" the same with other
# weights (a run trained from "tiny": the credit examples score a run against its base model), "tiny-tool" is
# save_tiny_tool_model (TRL's Qwen3 template, whose tool calls TRL parses); a Path is a dataset fixture file.
HUB_STAND_INS: dict[str, str | Path] = {
    "your-name/qwen-gnivo": "tiny-run",
    "Qwen/Qwen2.5-Math-1.5B": "tiny",
    "Qwen/Qwen2.5-Math-7B": "tiny",
    "Qwen/Qwen3-4B-Base": "tiny",
    "Qwen/Qwen3-0.6B": "tiny-tool",
    "DigitalLearningGmbH/MATH-lighteval": FIXTURES / "math_train.jsonl",
    "HuggingFaceH4/MATH-500": FIXTURES / "math500.parquet",
    "openai/gsm8k": FIXTURES / "gsm8k.jsonl",
    "LLM360/guru-RL-92k": FIXTURES / "guru_math.parquet",
}

# What a capped config trains for: one optimizer step of short completions on the CPU.
TRAINING_CAPS = dict(
    max_steps=1,
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    save_strategy="no",
    report_to="none",
    logging_steps=1,
)
MAX_COMPLETION_LENGTH = 16

FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Snippet:
    """One fenced ``python`` block: where it is (file and line) and its source, dedented."""

    origin: str
    line: int
    source: str


def python_blocks(text: str, origin: str, first_line: int = 1) -> list[Snippet]:
    """The fenced ``python`` blocks of Markdown ``text`` (a page or a docstring), in order."""
    blocks = []
    for match in FENCE.finditer(text):
        line = first_line + text.count("\n", 0, match.start()) + 1
        blocks.append(Snippet(origin, line, textwrap.dedent(match.group("body"))))
    return blocks


def documentation_pages() -> list[Path]:
    """README.md and every Markdown page of the docs site, in a stable order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def public_modules() -> list[str]:
    """``gnivo_trl`` and every module of it whose name does not start with ``_``, sorted."""
    import pkgutil

    import gnivo_trl

    names = [info.name for info in pkgutil.walk_packages(gnivo_trl.__path__, "gnivo_trl.")]
    return ["gnivo_trl", *sorted(name for name in names if not name.rpartition(".")[2].startswith("_"))]


def _own_members(module) -> Iterator[tuple[str, object]]:
    """The module, the public classes and functions it defines (``__all__``, else every public name), and their
    public methods, properties and nested classes: everything whose docstring a reader of the API or the source
    reads as documentation of ``module``."""
    yield module.__name__, module
    names = getattr(module, "__all__", None) or [name for name in vars(module) if not name.startswith("_")]
    for name in names:
        member = getattr(module, name, None)
        if not (inspect.isclass(member) or inspect.isfunction(member)):
            continue
        if getattr(member, "__module__", None) != module.__name__:
            continue  # re-exported: documented where it is defined
        yield f"{module.__name__}.{name}", member
        if inspect.isclass(member):
            for attribute, value in vars(member).items():
                if attribute.startswith("_"):
                    continue
                value = getattr(value, "__func__", value)  # classmethod, staticmethod
                value = getattr(value, "fget", value)  # property
                if inspect.isfunction(value) or inspect.isclass(value):
                    yield f"{module.__name__}.{name}.{attribute}", value


def docstrings() -> list[tuple[str, str]]:
    """``(where, docstring)`` of every public module, class, function and method of the package, each once."""
    found, seen = [], set()
    for module_name in public_modules():
        for name, member in _own_members(importlib.import_module(module_name)):
            doc = member.__doc__ and inspect.cleandoc(member.__doc__)  # its own docstring, never a parent's
            if doc and id(member) not in seen:
                seen.add(id(member))
                found.append((f"{name} docstring", doc))
    return found


def docstring_snippets() -> list[Snippet]:
    """The fenced ``python`` examples of every public docstring of the package (:func:`docstrings`)."""
    return [snippet for where, doc in docstrings() for snippet in python_blocks(doc, where)]


# A line that is only a code fence: three backticks (or tildes) and an optional language.
_FENCE_LINE = re.compile(r"^[ \t]*(?P<marks>`{2,}|~{3,})[ \t]*(?P<language>[\w+-]*)[ \t]*$")


def fence_problems(text: str, origin: str) -> list[str]:
    """What is wrong with the code fences of Markdown ``text`` (a page or a docstring); empty when nothing is.

    A fence must be exactly three backticks: two backticks render as prose (their ``#`` comments as headings) and are
    never run. Fences must pair up, and every ``python`` block must be one that :func:`python_blocks` finds (its
    closing fence at its opening fence's indentation). An ``Examples:`` section must hold a ``python`` block.
    """
    problems, open_fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE_LINE.match(line)
        if not match:
            continue
        if match.group("marks") != "```":
            problems.append(f"{origin}, line {number}: {line.strip()!r} is not a three-backtick fence")
        elif open_fence is None:
            open_fence = number
        elif not match.group("language"):
            open_fence = None
        else:
            problems.append(f"{origin}, line {number}: a fence opens inside the block opened on line {open_fence}")
    if open_fence is not None:
        problems.append(f"{origin}, line {open_fence}: the fence is never closed")
    opened = len(re.findall(r"^[ \t]*```python", text, re.M))
    if opened != len(python_blocks(text, origin)):
        problems.append(f"{origin}: {opened} python fences open but {len(python_blocks(text, origin))} blocks close")
    examples = re.search(r"^Examples?:\n(?P<body>(?:[ \t]+.*\n?|\n)*)", text, re.M)
    if examples and "```python" not in examples.group("body"):
        problems.append(f"{origin}: its Examples section has no ```python block")
    return problems


def substitute_hub_ids(source: str, local: Callable[[str | Path], str]) -> str:
    """``source`` with every quoted Hub id of :data:`HUB_STAND_INS` replaced by its stand-in's local path."""
    for hub_id, stand_in in HUB_STAND_INS.items():
        path = repr(local(stand_in))
        source = source.replace(f'"{hub_id}"', path).replace(f"'{hub_id}'", path)
    return source


def install_offline_stand_ins(monkeypatch, local: Callable[[str | Path], str]) -> None:
    """Point the dataset registry and the warm starts at the stand-ins, cap every training config, keep
    ``push_to_hub`` local."""
    import transformers
    from trl import GRPOConfig

    import gnivo_trl.data

    for name, spec in gnivo_trl.data.DATASETS.items():
        if spec.hub_id in HUB_STAND_INS:
            stand_in = dataclasses.replace(spec, hub_id=local(HUB_STAND_INS[spec.hub_id]))
            monkeypatch.setitem(gnivo_trl.data.DATASETS, name, stand_in)

    import gnivo_trl.agent_task
    import gnivo_trl.synthetic

    monkeypatch.setattr(gnivo_trl.synthetic, "build_warm_start", lambda *args, **kwargs: local("tiny"))
    monkeypatch.setattr(gnivo_trl.agent_task, "build_tool_warm_start", lambda *args, **kwargs: local("tiny-tool"))

    original_post_init = GRPOConfig.__post_init__

    def capped_post_init(self):
        for field, value in TRAINING_CAPS.items():
            setattr(self, field, value)
        self.max_completion_length = min(self.max_completion_length or MAX_COMPLETION_LENGTH, MAX_COMPLETION_LENGTH)
        original_post_init(self)

    monkeypatch.setattr(GRPOConfig, "__post_init__", capped_post_init)

    def local_push_to_hub(self, *args, **kwargs):
        self.save_model(self.args.output_dir)
        self.create_model_card(**{k: v for k, v in kwargs.items() if k in ("model_name", "dataset_name", "tags")})
        return f"(offline stand-in of the Hub) saved to {self.args.output_dir}"

    monkeypatch.setattr(transformers.Trainer, "push_to_hub", local_push_to_hub)

    original_train = transformers.Trainer.train

    def train_at_least_one_step(self, *args, **kwargs):
        output = original_train(self, *args, **kwargs)
        # A snippet whose dataset cannot fill one batch "trains" for 0 steps without an error: that is a broken
        # snippet too.
        assert self.state.global_step >= 1, "trainer.train() took no optimizer step (too few rows for one batch?)"
        return output

    monkeypatch.setattr(transformers.Trainer, "train", train_at_least_one_step)

    import gnivo_trl.credit

    original_score_completions = gnivo_trl.credit.score_completions

    def score_a_policy_against_another_model(*args, **kwargs):
        scores = original_score_completions(*args, **kwargs)
        # A model scored against itself gets a log-ratio of 0, hence zero credit, at every token: an example that does
        # so shows nothing and misleads whoever copies it.
        assert (scores.logp - scores.ref_logp).abs().max() > 0, (
            "a credit example scores a model against itself (zero credit everywhere): score a run against its base"
        )
        return scores

    monkeypatch.setattr(gnivo_trl.credit, "score_completions", score_a_policy_against_another_model)


def run_snippets(snippets: list[Snippet], namespace: dict, local: Callable[[str | Path], str]) -> None:
    """Execute ``snippets`` in order in ``namespace``; a failure names the block's file and line."""
    for snippet in snippets:
        source = substitute_hub_ids(snippet.source, local)
        try:
            code = compile(ast.parse(source), f"{snippet.origin}:{snippet.line}", "exec")
            exec(code, namespace)
        except BaseException as error:
            raise AssertionError(
                f"the python block at {snippet.origin}, line {snippet.line}, failed: {type(error).__name__}: {error}"
                f"\n--- block (Hub ids swapped) ---\n{source}"
            ) from error
