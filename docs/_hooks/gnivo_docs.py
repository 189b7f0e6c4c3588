"""MkDocs build hooks of the gnivo-trl site (``hooks:`` in mkdocs.yml).

* The site serves KaTeX itself (``make docs-vendor`` puts it under ``docs/assets/vendor/katex``): a build without it
  fails with the command that fixes it, instead of publishing pages whose equations never render.
* ``quickstart.md`` is generated from ``examples/notebooks/quickstart.ipynb`` with its stored outputs: code cells as
  ``python`` blocks, each cell's outputs in one block marked as output (consecutive prints merged, as Jupyter shows
  them), output images as files of the site. No script from a CDN renders it.
* The plots and HTML examples of ``benchmarks/results/<study>/`` are served as ``assets/results/<study>/<file>``
  from the study folders themselves, so a page always shows what the study last wrote (no copy to go stale).
* ``<!-- config-fields: gnivo_trl.GNIVOConfig -->`` in a page becomes a table of every field the config class
  declares, read from the dataclass itself (name, type, default and its ``help`` metadata).
* Inline code without whitespace (an identifier, a path, a value) gets the class ``identifier``, which the site's CSS
  keeps on one line: a table squeezes its prose, never an identifier, to fit the column.
"""

from __future__ import annotations

import base64
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


def _output_block(text: str) -> str:
    """A cell's text output, set apart from the code cells (the ``notebook-output`` class)."""
    fence = "````" if "```" in text else "```"
    return f'<div class="notebook-output" markdown>\n\n{fence}text\n{text.rstrip()}\n{fence}\n\n</div>'


def notebook_markdown() -> tuple[str, dict[str, bytes]]:
    """The quickstart notebook as Markdown with its stored outputs, and its output images by file name."""
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parts, images = [], {}
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown":
            parts.append(cell.source)
            continue
        if cell.cell_type != "code":
            continue
        parts.append(f"```python\n{cell.source}\n```")
        text = ""  # consecutive text outputs of a cell read as one, as Jupyter shows them
        for number, output in enumerate(cell.get("outputs", [])):
            data = output.get("data", {})
            if output.output_type == "stream":
                text += output.text
            elif "image/png" in data:
                if text:
                    parts.append(_output_block(text))
                    text = ""
                name = f"quickstart_files/quickstart_{index}_{number}.png"
                images[name] = base64.b64decode(data["image/png"])
                parts.append(
                    f'<div class="notebook-output" markdown>\n\n![output of cell {index}]({name})\n\n</div>'
                )
            elif output.output_type == "error":
                raise PluginError(
                    f"{NOTEBOOK.relative_to(ROOT)}: cell {index} stored an error; run `make notebook`"
                )
            elif "text/plain" in data:
                text += data["text/plain"] + "\n"
        if text:
            parts.append(_output_block(text))
    source = NOTEBOOK.relative_to(ROOT).as_posix()
    header = (
        f'!!! note "This page is a notebook"\n'
        f"    It is [`{source}`](https://github.com/gnivo-trl/gnivo-trl/blob/main/{source}) with the outputs it "
        "stored when it last ran (`make notebook` reruns it in place). CI executes it on every change. Outputs are "
        "the blocks marked *output*.\n\n"
    )
    # The notebook's own first heading is the page title; the note goes right under it.
    title, _, rest = "\n\n".join(parts).lstrip().partition("\n")
    return f"{title}\n\n{header}{rest}\n", images


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
    parent's marked. Two columns (the field with its type and default, then what it does) keep the table inside the
    content column."""
    module_name, _, class_name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    own = set(cls.__dict__.get("__annotations__", {}))
    parent_defaults = {
        f.name: f.default
        for base in cls.__mro__[1:]
        if dataclasses.is_dataclass(base)
        for f in dataclasses.fields(base)
    }
    rows = ["| field (type, default) | what it does |", "|---|---|"]
    for field in dataclasses.fields(cls):
        if field.name not in own:
            continue
        help_text = field.metadata.get("help", "")
        if not help_text:
            raise PluginError(
                f"{dotted}.{field.name} has no help metadata to document it"
            )
        if (
            field.name in parent_defaults
            and parent_defaults[field.name] != field.default
        ):
            help_text += (
                f" (GRPOConfig's default: {parent_defaults[field.name]!r}.)"
            )
        type_name = (
            field.type
            if isinstance(field.type, str)
            else getattr(field.type, "__name__", str(field.type))
        )
        rows.append(
            f"| `{field.name}`<br>`{type_name}`, `{field.default!r}` | {_cell(help_text)} |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files, **kwargs):
    return CONFIG_FIELDS.sub(
        lambda match: config_fields_table(match.group(1)), markdown
    )


# Inline code only: a ``<code>`` whose text has no whitespace and no markup (code blocks are ``<pre><code>`` with
# highlighting spans, or start with a newline).
_INLINE_IDENTIFIER = re.compile(r"<code>([^<\s]+)</code>")


def on_page_content(html_text, page, config, files, **kwargs):
    return _INLINE_IDENTIFIER.sub(
        r'<code class="identifier">\1</code>', html_text
    )
