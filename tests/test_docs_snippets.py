"""Every Python code block of the README, of the docs pages and of the docstrings the API reference renders runs
offline (tests/docs_snippets.py says how Hub ids become offline stand-ins)."""

from __future__ import annotations  # noqa: I001

import gnivo_trl.testing  # noqa: F401  (offline environment variables before any Hugging Face import)
from pathlib import Path

import pytest
from docs_snippets import (
    HUB_STAND_INS,
    ROOT,
    docstring_snippets,
    docstrings,
    documentation_pages,
    fence_problems,
    install_offline_stand_ins,
    python_blocks,
    run_snippets,
    substitute_hub_ids,
)

# The docs pages are in the repository, not in the sdist (MANIFEST.in); the README and the docstrings are in both.
pytestmark = pytest.mark.skipif(
    not (ROOT / "docs" / "index.md").is_file(),
    reason="the docs sources are not part of the sdist; run from a checkout",
)
PAGES = [page for page in documentation_pages() if python_blocks(page.read_text(), page.name)]
DOCSTRING_SNIPPETS = docstring_snippets()


@pytest.fixture(scope="module")
def stand_in_paths(tmp_path_factory) -> dict[str, str]:
    from gnivo_trl.testing import save_tiny_model, save_tiny_tool_model

    return {
        "tiny": save_tiny_model(tmp_path_factory.mktemp("tiny-model")),
        "tiny-run": save_tiny_model(tmp_path_factory.mktemp("tiny-run"), seed=1),
        "tiny-tool": save_tiny_tool_model(tmp_path_factory.mktemp("tiny-tool-model")),
    }


@pytest.fixture
def offline(stand_in_paths, tmp_path, monkeypatch):
    """Run in an empty directory, with the Hub stand-ins installed; returns the stand-in resolver."""

    def local(stand_in: str | Path) -> str:
        return str(stand_in) if isinstance(stand_in, Path) else stand_in_paths[stand_in]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is experimental in TRL 1.16
    install_offline_stand_ins(monkeypatch, local)
    return local


def test_the_docs_have_python_blocks_to_run():
    assert {page.name for page in PAGES} >= {"README.md", "index.md", "gnivo_trainer.md", "vimpo_trainer.md"}


def test_every_code_fence_is_well_formed_so_every_example_renders_and_runs():
    """A two-backtick fence renders as prose and escapes the snippet runs: every fence of every page and public
    docstring is a proper one, and every ``python`` block is collected (nothing is lost to a misplaced fence)."""
    problems = [p for where, doc in docstrings() for p in fence_problems(doc, where)]
    problems += [p for page in documentation_pages() for p in fence_problems(page.read_text(), page.name)]
    assert not problems, "\n".join(problems)


def test_every_class_of_the_api_reference_documents_an_example():
    """The development page promises an example per public class of the API reference: each class a page of
    docs/api/ renders (a ``::: path`` line, and for a module its ``__all__``) has a ``python`` block, which
    test_docstring_examples_run then runs."""
    import importlib
    import inspect
    import re

    missing = []
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        for dotted in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M):
            module_name, _, name = dotted.rpartition(".")
            rendered = getattr(importlib.import_module(module_name), name, None) or importlib.import_module(dotted)
            if inspect.ismodule(rendered):
                rendered = importlib.import_module(dotted)
                objects = [getattr(rendered, member) for member in rendered.__all__]
            else:
                objects = [rendered]
            missing += [o.__qualname__ for o in objects if inspect.isclass(o) and "```python" not in (o.__doc__ or "")]
    assert not missing, f"classes of the API reference without an example: {missing}"


def test_every_stand_in_exists_and_every_model_id_of_the_docs_has_one():
    for stand_in in HUB_STAND_INS.values():
        assert stand_in in ("tiny", "tiny-run", "tiny-tool") or stand_in.is_file()
    text = "\n".join(page.read_text() for page in documentation_pages())
    for model_id in set(__import__("re").findall(r"model=\"([\w.-]+/[\w.-]+)\"", text)):
        assert model_id in HUB_STAND_INS, f"{model_id} is used in the docs but has no offline stand-in"


def test_hub_ids_are_swapped_only_where_quoted():
    source = 'model = "Qwen/Qwen3-0.6B"\nnote = "see Qwen/Qwen3-0.6B"\nother = \'Qwen/Qwen2.5-Math-1.5B\''
    swapped = substitute_hub_ids(source, lambda stand_in: f"/local/{stand_in}")
    assert swapped == "model = '/local/tiny-tool'\nnote = \"see Qwen/Qwen3-0.6B\"\nother = '/local/tiny'"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_page_snippets_run(page, offline):
    run_snippets(python_blocks(page.read_text(), str(page.relative_to(ROOT))), {"__name__": "__docs__"}, offline)


@pytest.mark.slow
@pytest.mark.parametrize("snippet", DOCSTRING_SNIPPETS, ids=lambda snippet: f"{snippet.origin}:{snippet.line}")
def test_docstring_examples_run(snippet, offline):
    run_snippets([snippet], {"__name__": "__docs__"}, offline)
