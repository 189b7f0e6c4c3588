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
    documentation_pages,
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
    assert len(DOCSTRING_SNIPPETS) >= 4


def test_every_stand_in_exists_and_every_model_id_of_the_docs_has_one():
    for stand_in in HUB_STAND_INS.values():
        assert stand_in in ("tiny", "tiny-tool") or stand_in.is_file()
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
