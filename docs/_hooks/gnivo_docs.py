"""MkDocs build hooks of the gnivo-trl site (``hooks:`` in mkdocs.yml).

* The site serves KaTeX itself (``make docs-vendor`` puts it under ``docs/assets/vendor/katex``): a build without it
  fails with the command that fixes it, instead of publishing pages whose equations never render.
* ``quickstart.md`` is generated from ``examples/notebooks/quickstart.ipynb`` with its stored outputs (nbconvert's
  Markdown exporter; the output images become files of the site), so the notebook is rendered without any script
  from a CDN.
* The plots and HTML examples of ``benchmarks/results/<study>/`` are served as ``assets/results/<study>/<file>``
  from the study folders themselves, so a page always shows what the study last wrote (no copy to go stale).
* ``<!-- config-fields: gnivo_trl.GNIVOConfig -->`` in a page becomes a table of every field the config class
  declares, read from the dataclass itself (name, type, default and its ``help`` metadata).
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "notebooks" / "quickstart.ipynb"
NOTEBOOK_PAGE = "quickstart.md"
RESULTS = ROOT / "benchmarks" / "results"
# The reports (.md) stay on GitHub: as site pages they would need a nav entry.
RESULT_SUFFIXES = (".png", ".html")
KATEX = ROOT / "docs" / "assets" / "vendor" / "katex" / "katex.min.js"
CONFIG_FIELDS = re.compile(r"<!-- config-fields: ([\w.]+) -->")


def on_config(config, **kwargs):
    if not KATEX.is_file():
        raise PluginError(
            f"{KATEX.relative_to(ROOT)} is missing: the site serves KaTeX itself. Run `make docs-vendor` (or `make "
            "docs`, which runs it) first."
        )
    return config


def notebook_markdown() -> tuple[str, dict[str, bytes]]:
    """The quickstart notebook as Markdown with its stored outputs, and its output images by file name."""
    import nbformat
    from nbconvert import MarkdownExporter

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    body, resources = MarkdownExporter().from_notebook_node(
        notebook,
        resources={
            "output_files_dir": "quickstart_files",
            "unique_key": "quickstart",
        },
    )
    source = NOTEBOOK.relative_to(ROOT).as_posix()
    header = (
        f'!!! note "This page is a notebook"\n'
        f"    It is [`{source}`](https://github.com/gnivo-trl/gnivo-trl/blob/main/{source}) with the outputs it "
        "stored when it last ran (`make notebook` reruns it in place). CI executes it on every change.\n\n"
    )
    # The notebook's own first heading is the page title; the note goes right under it.
    title, _, rest = body.lstrip().partition("\n")
    return f"{title}\n\n{header}{rest}", resources.get("outputs", {})


def on_files(files, config, **kwargs):
    markdown, images = notebook_markdown()
    files.append(File.generated(config, NOTEBOOK_PAGE, content=markdown))
    for name, data in images.items():
        files.append(File.generated(config, name, content=data))
    for path in sorted(RESULTS.rglob("*")):
        if path.suffix in RESULT_SUFFIXES:
            uri = f"assets/results/{path.relative_to(RESULTS).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def _cell(text: str) -> str:
    return (
        html.escape(text, quote=False).replace("|", "&#124;").replace("\n", " ")
    )


def config_fields_table(dotted: str) -> str:
    """A Markdown table of the fields ``dotted`` (a dataclass) declares itself, with defaults differing from its
    parent's marked."""
    module_name, _, class_name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    own = set(cls.__dict__.get("__annotations__", {}))
    parent_defaults = {
        f.name: f.default
        for base in cls.__mro__[1:]
        if dataclasses.is_dataclass(base)
        for f in dataclasses.fields(base)
    }
    rows = ["| field | type | default | what it does |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.name not in own:
            continue
        help_text = field.metadata.get("help", "")
        if not help_text:
            raise PluginError(
                f"{dotted}.{field.name} has no help metadata to document it"
            )
        if field.name in parent_defaults:
            help_text += (
                f" (GRPOConfig's default: {parent_defaults[field.name]!r}.)"
            )
        type_name = (
            field.type
            if isinstance(field.type, str)
            else getattr(field.type, "__name__", str(field.type))
        )
        rows.append(
            f"| `{field.name}` | `{type_name}` | `{field.default!r}` | {_cell(help_text)} |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files, **kwargs):
    return CONFIG_FIELDS.sub(
        lambda match: config_fields_table(match.group(1)), markdown
    )
