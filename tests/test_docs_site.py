"""The documentation site builds with ``mkdocs build --strict`` and renders in a real browser as a reader sees it.

The site is served on 127.0.0.1 and opened in headless Chromium (Debian's package, installed by ``make chromium``;
without it these tests fail, they do not skip).

* Every page is laid out at 1280 px and checked by ``tests/docs_layout.js``: no identifier in a table broken across
  lines, no display equation, code block or table wider than the content column.
* The screenshotted pages are checked the way a reader would notice a problem. Equations must be typeset by KaTeX,
  with no raw ``$$`` or ``\\(`` left in the text. Tables must be present. Every image and embedded page must load
  from the site itself, and the screenshot must not be blank. ``make docs-screenshots`` copies the screenshots to
  ``docs/assets/screenshots/``, where the docs show them.
* In the built HTML: no heading inside an API docstring (a sign of a broken code fence), the notebook's outputs set
  apart from its code and free of warnings.
* In the sources: nested lists indented as Python-Markdown needs, and every number quoted next to a results file
  found in that file.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from decimal import Decimal
from html import unescape
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
SCREENSHOTS = DOCS / "assets" / "screenshots"
LAYOUT_CHECK = Path(__file__).with_name("docs_layout.js")

# The docs sources (pages, their images, mkdocs.yml) are in the repository, not in the sdist (MANIFEST.in): the site is
# built and checked from a checkout, as CI does.
pytestmark = pytest.mark.skipif(
    not (ROOT / "mkdocs.yml").is_file(), reason="the docs sources are not part of the sdist; run from a checkout"
)
WIDTH = 1280

# Page, the screenshot's height (from the top: down to the trainer pages' diagram and loss, the credit page's embedded
# example), and what it must render: at least this many typeset equations, tables, images and embedded pages.
PAGES = {
    "home": ("index.html", 1500, dict(equations=0, tables=0, images=0, frames=0)),
    "gnivo_trainer": ("gnivo_trainer/index.html", 3000, dict(equations=10, tables=4, images=2, frames=0)),
    "vimpo_trainer": ("vimpo_trainer/index.html", 3300, dict(equations=20, tables=4, images=2, frames=0)),
    "which_method": ("which_method/index.html", 2600, dict(equations=0, tables=2, images=0, frames=0)),
    "results": ("results/index.html", 2000, dict(equations=3, tables=8, images=8, frames=0)),
    "quickstart": ("quickstart/index.html", 2600, dict(equations=0, tables=0, images=1, frames=0)),
    "credit": ("credit/index.html", 2300, dict(equations=3, tables=0, images=1, frames=1)),
    "api_credit": ("api/credit/index.html", 2000, dict(equations=0, tables=0, images=0, frames=0)),
}


def site_path(page: Path) -> str:
    """The built page of a docs source page (``docs/a/b.md`` -> ``a/b/index.html``)."""
    relative = page.relative_to(DOCS).with_suffix("")
    return "index.html" if relative.as_posix() == "index" else f"{relative.as_posix()}/index.html"


# Every page of the site: the Markdown pages of docs/ and the page the build hook generates from the notebook.
SITE_PAGES = sorted(
    {site_path(page) for page in DOCS.rglob("*.md") if "_hooks" not in page.parts} | {"quickstart/index.html"}
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with --strict into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def server(site):
    """The built site over HTTP on 127.0.0.1 (KaTeX's fonts do not load from file:// URLs), every HTML page served
    with ``tests/docs_layout.js`` appended (a hidden report; the built files are unchanged)."""
    layout_check = f"<script>{LAYOUT_CHECK.read_text()}</script></body>"

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            path = Path(self.translate_path(self.path))
            path = path / "index.html" if path.is_dir() else path
            if path.suffix != ".html" or not path.is_file() or not self.path.split("?")[0].endswith(("/", ".html")):
                return super().send_head()
            body = path.read_text(encoding="utf-8").replace("</body>", layout_check).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return io.BytesIO(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: run `make chromium` (Debian's package; `make test` runs it)")
    return path


def run_chromium(tmp_path: Path, url: str, *arguments: str, height: int = 2000) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url`` with a fresh profile, no network but the local server, scripts given time."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{height}",
        "--virtual-time-budget=15000",
        *arguments,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@dataclass
class RenderedPage(HTMLParser):
    """What a reader sees in a rendered DOM: visible text, typeset equations, tables, images and frames."""

    text: list[str] = field(default_factory=list)
    equations: int = 0  # arithmatex elements
    typeset: int = 0  # arithmatex elements holding KaTeX output
    tables: int = 0
    images: list[str] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)
    _stack: list[tuple[str, bool, bool]] = field(default_factory=list)  # (tag, hidden text, inside arithmatex)

    def __post_init__(self):
        HTMLParser.__init__(self)

    _VOID = {"img", "br", "hr", "meta", "link", "input", "source", "col", "wbr", "area", "base", "embed"}

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        parent_hidden, parent_math = self._stack[-1][1:] if self._stack else (False, False)
        if tag == "img":
            self.images.append(attributes.get("src", ""))
        if tag == "iframe":
            self.frames.append(attributes.get("src", ""))
        if tag == "table":
            self.tables += 1
        if "arithmatex" in classes:
            self.equations += 1
            self._typeset_seen = False
        if "katex" in classes and parent_math and not getattr(self, "_typeset_seen", True):
            self.typeset += 1
            self._typeset_seen = True
        # Code, scripts and KaTeX's own copy of the TeX source are not prose a reader reads as text.
        hidden = parent_hidden or tag in ("script", "style", "code", "pre", "annotation", "noscript")
        if tag not in self._VOID:
            self._stack.append((tag, hidden, parent_math or "arithmatex" in classes))

    def handle_endtag(self, tag):
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if not (self._stack and self._stack[-1][1]):
            self.text.append(data)


def fetch(url: str) -> tuple[int, bytes, str]:
    with urllib.request.urlopen(url, timeout=30) as response:  # the local server only
        return response.status, response.read(), response.headers.get("Content-Type", "")


def test_site_builds_strictly_with_every_page(site):
    for page in (
        "index.html",
        "quickstart/index.html",
        "gnivo_trainer/index.html",
        "vimpo_trainer/index.html",
        "algorithms/index.html",
        "results/index.html",
        "troubleshooting/index.html",
        "api/losses/index.html",
        "changelog/index.html",
    ):
        assert (site / page).is_file(), page
    # The trainer pages' config tables are generated from the dataclasses, every field included.
    vimpo = (site / "vimpo_trainer" / "index.html").read_text()
    for name in ("vimpo_adaptive_actor_eps", "vimpo_kl_estimator"):
        assert re.search(rf"<code[^>]*>{name}</code>", vimpo), name
    # The site serves KaTeX itself and pulls nothing from a CDN or Google Fonts.
    assert (site / "assets" / "vendor" / "katex" / "katex.min.js").is_file()
    for html_file in site.rglob("*.html"):
        text = html_file.read_text()
        assert "fonts.googleapis" not in text and "cdnjs" not in text and "cdn.jsdelivr" not in text, html_file


def test_notebook_page_shows_the_notebooks_outputs(site):
    page = (site / "quickstart" / "index.html").read_text()
    assert "Test accuracy" in page and "quickstart_files/" in page  # the stored outputs and their plot


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAGES))
def test_page_renders_in_chromium(name, server, tmp_path):
    path, height, expected = PAGES[name]
    url = urljoin(server, path)
    dom = run_chromium(tmp_path, url, "--dump-dom").stdout
    page = RenderedPage()
    page.feed(dom)
    text = " ".join(page.text)

    assert "md-content" in dom and len(text.split()) > 100, "the page rendered (almost) nothing"
    assert page.equations >= expected["equations"], f"{page.equations} equations"
    assert page.typeset == page.equations, f"only {page.typeset} of {page.equations} equations typeset by KaTeX"
    for raw in ("$$", "\\(", "\\)", "\\[", "\\]"):
        assert raw not in text, f"raw TeX delimiter {raw!r} left in the page's text"
    assert page.tables >= expected["tables"]
    assert len(page.images) >= expected["images"]
    assert len(page.frames) >= expected["frames"]
    for source in page.images + page.frames:
        if source.startswith("data:"):
            continue
        status, body, content_type = fetch(urljoin(url, source))
        assert status == 200 and body, source
        if source.endswith(".png"):
            from PIL import Image

            Image.open(__import__("io").BytesIO(body)).verify()  # a real, complete PNG
        elif source.endswith(".svg"):
            assert "svg" in content_type and b"<svg" in body, (source, content_type)
        else:
            assert "html" in content_type, (source, content_type)

    shot = tmp_path / f"{name}.png"
    run_chromium(tmp_path, url, f"--screenshot={shot}", height=height)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (WIDTH, height)
        grey = image.convert("L")
        histogram = grey.histogram()
        non_white = sum(histogram[:240]) / (image.size[0] * image.size[1])
        assert non_white > 0.02, f"the screenshot is (nearly) blank: {non_white:.1%} of pixels are not white"
    if os.environ.get("GNIVO_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOTS / f"{name}.png")


# ---------------------------------------------------------------------------------------------------------------------
# Layout at 1280 px, on every page
# ---------------------------------------------------------------------------------------------------------------------


def layout_report(dom: str) -> dict:
    match = re.search(r'<pre id="layout-report" hidden="">(.*?)</pre>', dom, re.S)
    assert match, "tests/docs_layout.js did not report (a script error on the page?)"
    return json.loads(unescape(match.group(1)))


@pytest.mark.slow
@pytest.mark.parametrize("path", SITE_PAGES)
def test_page_layout_fits_the_column_at_1280_px(path, server, tmp_path):
    """Material breaks inline code anywhere and lets equations, code and tables run past the column; none of that may
    happen on any page at 1280 px (tests/docs_layout.js measures it in the rendered page)."""
    report = layout_report(run_chromium(tmp_path, urljoin(server, path), "--dump-dom").stdout)
    assert not report["brokenIdentifiers"], f"identifiers in tables broken across lines: {report['brokenIdentifiers']}"
    assert not report["wideEquations"], f"display equations wider than the column: {report['wideEquations']}"
    assert not report["wideCode"], f"code lines wider than the column: {report['wideCode']}"
    assert not report["wideTables"], f"tables wider than the column: {report['wideTables']}"


# ---------------------------------------------------------------------------------------------------------------------
# The built HTML
# ---------------------------------------------------------------------------------------------------------------------


def test_api_pages_have_no_heading_inside_a_docstring(site):
    """mkdocstrings gives every documented object a ``doc-heading``; any other heading in an API page comes from a
    docstring (a ``#`` comment of an example whose fence is broken, which also fills the table of contents)."""
    for page in sorted((site / "api").glob("*/index.html")):
        text = page.read_text()
        article = text[text.index("<article") : text.index("</article>")]
        headings = re.findall(r"<h([2-6])([^>]*)>(.*?)</h\1>", article, re.S)
        stray = [
            re.sub(r"<[^>]+>", "", body).strip() for _, attributes, body in headings if "doc-heading" not in attributes
        ]
        assert not stray, f"{page.relative_to(site)}: headings inside docstrings: {stray}"
        toc = re.findall(r'<a href="#([^"]+)" class="md-nav__link">', text)
        assert all(anchor.startswith("gnivo_trl") for anchor in toc), (
            f"{page.relative_to(site)}: table of contents {toc}"
        )


def test_notebook_outputs_are_set_apart_and_free_of_warnings(site):
    """The notebook page shows each cell's stored outputs in a block marked as output (consecutive prints in one),
    and no stored output is a warning: the page is what a reader gets, not the log of the machine it ran on."""
    page = (site / "quickstart" / "index.html").read_text()
    outputs = re.findall(r'<div class="notebook-output">(.*?)</div>\s*(?=<|$)', page, re.S)
    assert len(outputs) >= 4, "the notebook's outputs are not marked as outputs"
    assert any(
        "step  100: test accuracy" in unescape(o) and "step    0: test accuracy" in unescape(o) for o in outputs
    ), "the accuracy prints of one cell are not one output block"
    for output in outputs:
        text = unescape(re.sub(r"<[^>]+>", "", output))
        assert not re.search(r"warn", text, re.I), f"a stored output is a warning: {text[:300]}"
        assert "\n\n\n" not in text.strip(), f"blank lines in a stored output: {text[:300]!r}"


# ---------------------------------------------------------------------------------------------------------------------
# The sources
# ---------------------------------------------------------------------------------------------------------------------


def markdown_sources() -> list[Path]:
    """What Python-Markdown renders for the site: the pages, and the changelog (included by docs/changelog.md)."""
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]


def without_code_blocks(text: str) -> str:
    """``text`` with fenced code blocks blanked (line numbers kept)."""
    return re.sub(r"^([ \t]*)```.*?^\1```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)


NESTED_TOO_LITTLE = re.compile(r"^( {1,3})(?:[-*+]|\d+[.)]) ", re.M)


def test_nested_lists_are_indented_by_four_spaces():
    """Python-Markdown nests a list only under 4 spaces of indentation: with 1 to 3 the sub-items render as items of
    the outer list, and which number belongs to which claim is lost. GitHub renders 4 spaces the same way."""
    from docs_snippets import docstrings

    sources = [(str(path.relative_to(ROOT)), path.read_text()) for path in markdown_sources()] + docstrings()
    flattened = [
        f"{where}, line {text.count(chr(10), 0, match.start()) + 1}"
        for where, text in sources
        for match in NESTED_TOO_LITTLE.finditer(without_code_blocks(text))
    ]
    assert not flattened, f"list items indented by fewer than 4 spaces (rendered flat): {flattened}"


# Result files are named by their study folder and file name (`agents/agent_learning.md`, a link to it), or by a file
# name that exists in one study only.
STUDIES = sorted(path.name for path in RESULTS.iterdir() if path.is_dir())
RESULT_FILE = re.compile(r"(?:\b(" + "|".join(STUDIES) + r")/)?\b([\w.-]+\.md)\b")
# A number as a reader reads it: signed or not, a decimal or 5e-3, maybe a percentage; not part of a name (Qwen2.5,
# 0.5B, 8-step, K=8 counts: `8` is a number there).
QUOTED_NUMBER = re.compile(r"(?<![\w.+\-−])([+\-−]?)(\d+(?:\.\d+)?(?:e-?\d+)?)(?![\w.]*[A-Za-wyz_])(%?)")
FILE_NUMBER = re.compile(r"([+\-−]?)(\d+(?:\.\d+)?(?:e-?\d+)?)")
INTERVAL = re.compile(r"\[[+\-−]?\d+(?:\.\d+)?, [+\-−]?\d+(?:\.\d+)?\]")


def _value(sign: str, digits: str) -> Decimal:
    return (-1 if sign in ("-", "−") else 1) * Decimal(digits)


def prose(text: str) -> str:
    """What of a Markdown section states numbers in words: no code, no math (a computation, not a quote), no link
    targets, HTML tags or heading anchors."""
    text = without_code_blocks(text)
    for pattern in (r"`[^`\n]*`", r"\$\$.*?\$\$", r"\$[^$\n]*\$", r"<[^>]*>", r"\{#[\w-]+\}"):
        text = re.sub(pattern, " ", text, flags=re.S)
    text = re.sub(r"(\d)-(?=\d)", r"\1 to ", text)  # a range, 0.98-1.69x: two numbers
    return re.sub(r"\]\([^)]*\)", "]", text)


def sections(text: str) -> list[str]:
    return re.split(r"^(?=#{1,6} )", without_code_blocks(text), flags=re.M)


def named_result_files(section: str) -> list[Path]:
    """The results files ``section`` names; next to one, ``benchmarks/README.md`` counts too (its estimates from
    tensor shapes)."""
    files = []
    for study, name in RESULT_FILE.findall(section):
        candidates = [RESULTS / study / name] if study else list(RESULTS.glob(f"*/{name}"))
        if len(candidates) == 1 and candidates[0].is_file():
            files.append(candidates[0])
    if files and "benchmarks/README.md" in section:
        files.append(ROOT / "benchmarks" / "README.md")
    return files


def unfound_numbers(section: str) -> list[str]:
    """The numbers of ``section``'s prose that none of the results files it names contains (a percentage may also
    be found as a fraction: 25% as p = 0.25)."""
    files = named_result_files(section)
    found = {_value(sign, digits) for path in files for sign, digits in FILE_NUMBER.findall(path.read_text())}
    return [
        f"{sign}{digits}{percent}"
        for sign, digits, percent in QUOTED_NUMBER.findall(prose(section))
        if _value(sign, digits) not in found and not (percent and _value(sign, digits) / 100 in found)
    ]


REPOSITORY_LINK = re.compile(r"github\.com/gnivo-trl/gnivo-trl/(?:blob|tree)/main/([^)#\s\"'`]+)")


def test_links_into_the_repository_name_files_that_exist():
    """A page links results and sources by their address on GitHub, which the site build cannot check: a file moved
    (into ``benchmarks/results/archive/``, say) would leave a dead link."""
    dead = [
        f"{path.relative_to(ROOT)}: {target}"
        for path in markdown_sources()
        for target in REPOSITORY_LINK.findall(path.read_text())
        if not (ROOT / target).exists()
    ]
    assert not dead, dead


def test_the_number_check_finds_what_a_results_file_lacks():
    section = "## Agents\n\nVIMPO -3.9 [-7.6, -0.2] ($\\beta L = 3.21$, `lr=1.234`), turn units 123.45, 98.76%.\n\n"
    section += "File: `agents/agent_learning.md`."
    assert unfound_numbers(section) == ["123.45", "98.76%"]  # code and math are not quotes
    assert unfound_numbers(section.replace("-3.9", "+3.9")) == ["+3.9", "123.45", "98.76%"]  # the sign counts
    assert named_result_files("Quoted without a file: 12.345.") == []  # the next test says what that means


@pytest.mark.parametrize("source", markdown_sources()[:1] + sorted(DOCS.rglob("*.md")), ids=lambda p: p.name)
def test_numbers_next_to_a_results_file_are_in_it(source):
    """Every section (a heading and its text) that names a results file quotes only numbers found in the files it
    names; a section that quotes a measured interval names its file. A number that does not come from the results
    (a setting, a computation) is written as code or math."""
    for section in sections(source.read_text()):
        heading = section.splitlines()[0] if section.strip() else "(top)"
        if named_result_files(section):
            assert not unfound_numbers(section), (
                f"{source.name}, {heading!r}: {unfound_numbers(section)} are in none of "
                f"{sorted({str(p.relative_to(ROOT)) for p in named_result_files(section)})}"
            )
        elif INTERVAL.search(prose(section)):
            pytest.fail(
                f"{source.name}, {heading!r} quotes {INTERVAL.search(prose(section)).group(0)} but names no results file"
            )


# An estimate with its paired interval, as the summary tables quote it: "+1.3 F1 [-0.9, +3.6]", "-3.9 pp [-7.6, -0.2]".
ESTIMATE_WITH_INTERVAL = re.compile(
    r"([+\-−]?\d+(?:\.\d+)?)(?:\s*(?:pp|points|F1))?\s*\[([+\-−]?\d+(?:\.\d+)?), ([+\-−]?\d+(?:\.\d+)?)\]"
)


def results_page_sections() -> dict[str, str]:
    """The sections of docs/results.md by their anchor (``## Title {#anchor}``)."""
    found = {}
    for part in re.split(r"^(?=## )", (DOCS / "results.md").read_text(), flags=re.M):
        match = re.match(r"## .*\{#([\w-]+)\}", part)
        if match:
            found[match.group(1)] = part
    return found


def test_summary_rows_quote_what_their_results_section_shows():
    """A row of a summary table (the README's results table, the Results page's findings) links to a section of the
    Results page; every estimate with its interval in the row is shown in that section, so that a reader who follows
    the link finds the number (a summary may not quote a row the section's table leaves out)."""
    by_anchor = results_page_sections()
    rows = [
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("|") and "results/#" in line
    ]
    rows += [line for line in by_anchor["findings"].splitlines() if line.startswith("|") and "](#" in line]
    assert len(rows) >= 10, "the summary tables were not found"
    unshown = []
    for row in rows:
        anchors = re.findall(r"(?:results/)?#([\w-]+)\)", row)
        assert anchors and all(anchor in by_anchor for anchor in anchors), (row, anchors)
        shown = set(ESTIMATE_WITH_INTERVAL.findall("".join(by_anchor[anchor] for anchor in anchors)))
        unshown += [(anchors, quote) for quote in ESTIMATE_WITH_INTERVAL.findall(row) if quote not in shown]
    assert not unshown, f"summary numbers their linked Results section does not show: {unshown}"


@pytest.mark.parametrize("name", ["GNIVOConfig", "VIMPOConfig"])
def test_config_docstring_lists_the_defaults_that_differ_from_grpo_config(name):
    """The config's docstring (the API page) names, as `field=value`, exactly the fields whose default differs from
    `GRPOConfig`'s, with their values."""
    import dataclasses
    import inspect

    from trl import GRPOConfig

    import gnivo_trl

    cls = getattr(gnivo_trl, name)
    parent = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    differing = {
        f.name: repr(f.default) for f in dataclasses.fields(cls) if f.name in parent and f.default != parent[f.name]
    }
    doc = " ".join(inspect.getdoc(cls).split())
    sentence = re.search(
        r"(?:Defaults that differ from `GRPOConfig`|The only default that differs from `GRPOConfig` is)(.*?)\.(?:\s|$)",
        doc,
    )
    assert sentence, f"{name}'s docstring does not say which defaults differ from GRPOConfig's"
    assert dict(re.findall(r"`(\w+)=([^`]+)`", sentence.group(1))) == differing


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_home_quickstart_is_the_readmes():
    """The home page's quickstart runs the same code as the README's (layout and comments aside)."""
    import ast

    readme, home = (
        python_blocks((ROOT / "README.md").read_text())[0],
        python_blocks((DOCS / "index.md").read_text())[0],
    )
    assert ast.dump(ast.parse(home)) == ast.dump(ast.parse(readme))


@pytest.mark.parametrize("page", [ROOT / "README.md", DOCS / "index.md"], ids=lambda p: p.name)
def test_install_instructions_serve_pip_users(page):
    """The install block lists every user-facing extra of pyproject.toml; the page says what needs a clone and gives
    the pip equivalent of `make demo`, with options the demo accepts."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    user_extras = extras - {"test", "docs", "dev"}
    text = page.read_text()
    install = re.search(r"^```bash\n(pip install .*?)^```", text, flags=re.S | re.M).group(1)
    listed = set(re.findall(r'pip install "gnivo-trl\[(\w+)\]"', install))
    assert listed == user_extras, (
        f"{page.name}: install block lists {sorted(listed)}, pyproject has {sorted(user_extras)}"
    )
    assert re.search(r"clone", text) and "make demo" in text
    from gnivo_trl.demo import parse_arguments

    commands = re.findall(r"python -m gnivo_trl\.demo([^`\n]*)", " ".join(text.split()))
    assert commands, f"{page.name} does not give the pip equivalent of `make demo`"
    for arguments in commands:
        parse_arguments(arguments.split())  # exits on an option the demo does not know


def test_results_page_opens_with_its_findings():
    """A reader comes for the answers: the Results page's first section is the table of findings with their verdicts,
    and the map of result files comes last."""
    by_anchor = results_page_sections()
    anchors = list(by_anchor)
    assert anchors[0] == "findings" and anchors[-1] == "result-files", anchors
    findings = by_anchor["findings"]
    assert findings.count("\n|") >= 8 and "**No**" in findings and "**Not reproduced**" in findings


def claim_verdicts() -> list[tuple[str, str, tuple[str, str, str]]]:
    """Each paper claim of ``paper_claims/paper_claims.md``: its number, its verdict and its primary comparison's
    estimate with interval."""
    claims = []
    for line in (RESULTS / "paper_claims" / "paper_claims.md").read_text().splitlines():
        match = re.match(r"\| (\d+)\. .*? \| \*\*([^*]+)\*\* \|", line)
        if match:
            claims.append((match.group(1), match.group(2), ESTIMATE_WITH_INTERVAL.search(line).groups()))
    return claims


def table_rows_and_paragraphs(text: str) -> list[str]:
    """The units a verdict must share with the number it judges: each row of a table, each other paragraph."""
    return [
        line if line.startswith("|") else paragraph
        for paragraph in re.split(r"\n\s*\n", without_code_blocks(text))
        for line in (paragraph.splitlines() if paragraph.lstrip().startswith("|") else [paragraph])
    ]


@pytest.mark.parametrize(
    "page", [DOCS / "which_method.md", DOCS / "results.md", ROOT / "README.md"], ids=lambda p: p.name
)
def test_claim_verdicts_are_stated_as_the_results_file_states_them(page):
    """Where a page quotes a paper claim's primary comparison, the same table row or paragraph gives the claim's
    verdict as paper_claims.md decides it (a gain elsewhere does not turn "inconclusive" into "reproduced")."""
    claims = claim_verdicts()
    assert len(claims) == 4, claims
    blocks = table_rows_and_paragraphs(page.read_text())
    for number, verdict, quote in claims:
        quoting = [block for block in blocks if quote in ESTIMATE_WITH_INTERVAL.findall(block)]
        assert quoting, f"{page.name} does not quote claim {number}'s primary comparison {quote}"
        assert any(verdict.lower() in block.lower() for block in quoting), (
            f"{page.name}: claim {number}'s primary comparison {quote} is quoted without its verdict {verdict!r}"
        )


def noise_control_verdicts(summary: str) -> tuple[str, list[tuple[str, str, tuple[str, str, str]]]]:
    """From ``noise_controls.md``'s text: the claim-level verdict and, per cell whose primary comparison has an
    interval, its cell, its verdict as the file shows it ("not decided yet (n of 10 seeds)" included) and its
    estimate with interval."""
    claim = re.search(r"Claim-level verdict: \*\*([^*]+)\*\*", summary).group(1)
    rows = []
    for line in summary.splitlines():
        match = re.match(r"\| `([\w-]+)` \| VIMPO − strongest anchored GRPO .*\| ([^|]+) \|$", line)
        quote = ESTIMATE_WITH_INTERVAL.search(line)
        if match and quote and (match.group(1), match.group(2), quote.groups()) not in rows:
            rows.append((match.group(1), match.group(2).strip(), quote.groups()))
    return claim, rows


def noise_control_misquotes(page_text: str, summary: str) -> list[str]:
    """Where a page quotes a noise-controls primary comparison, the same table row or paragraph must give its verdict
    as the file does; once the file decides the claim-level verdict, the page must state it next to the anchored
    GRPO it is measured against."""
    claim, rows = noise_control_verdicts(summary)
    blocks = table_rows_and_paragraphs(page_text)
    wrong = []
    for cell, verdict, quote in rows:
        for block in blocks:
            # "inconclusive so far (2 of the family open)": the page gives the verdict, the file says why
            if quote in ESTIMATE_WITH_INTERVAL.findall(block) and verdict.split(" (")[0].lower() not in block.lower():
                wrong.append(f"{cell} {quote} quoted without {verdict!r}")
    if not claim.startswith("not decided") and not any(
        f"**{claim}**".lower() in block.lower() and "anchored" in block for block in blocks
    ):
        wrong.append(f"the claim-level verdict {claim!r} against the anchored GRPO is not stated")
    return wrong


def test_the_noise_controls_check_finds_a_misquote():
    summary = (
        "Claim-level verdict: **inconclusive** (rule).\n\n"
        "| `group-h8` | VIMPO − strongest anchored GRPO (a − b) | +4.1 [+0.5, +7.7], n = 10 | 0.03 | 0.04 | 8 of 10 "
        "| inconclusive |\n"
    )
    assert noise_control_verdicts(summary) == (
        "inconclusive",
        [("group-h8", "inconclusive", ("+4.1", "+0.5", "+7.7"))],
    )
    good = "Against anchored GRPO: **inconclusive**; 8-step: +4.1 pp [+0.5, +7.7], inconclusive.\n"
    assert noise_control_misquotes(good, summary) == []
    bad = "VIMPO leads anchored GRPO by +4.1 pp [+0.5, +7.7] on 8-step problems.\n"
    assert len(noise_control_misquotes(bad, summary)) == 2


@pytest.mark.parametrize("page", [DOCS / "results.md", ROOT / "README.md"], ids=lambda p: p.name)
def test_noise_controls_verdicts_are_stated_as_the_results_file_states_them(page):
    summary = (RESULTS / "noise_controls" / "noise_controls.md").read_text()
    assert noise_control_misquotes(page.read_text(), summary) == []


# History and process belong in the CHANGELOG (and the development page); user pages say what is, not what was.
MAINTENANCE_TALK = re.compile(
    r"\b(until this release|in this release|this release (?:fixes|adds)|no longer crashes|used to crash|"
    r"the one place (?:on|in)|the machines? these runs|(?:was|were) built to catch|reconstructed from git|"
    r"anchors, which stay stable|so that a change shows up|is that of the current code)\b",
    re.IGNORECASE,
)


def test_user_pages_hold_no_maintenance_talk():
    pages = [
        ROOT / "README.md",
        *(p for p in sorted(DOCS.rglob("*.md")) if p.name not in ("changelog.md", "development.md")),
    ]
    found = [
        f"{page.relative_to(ROOT)}: {match.group(0)!r}"
        for page in pages
        for match in MAINTENANCE_TALK.finditer(" ".join(page.read_text().split()))
    ]
    assert not found, f"maintenance talk on user pages (history goes in the CHANGELOG): {found}"


def test_the_trainer_step_diagram_is_what_its_script_draws():
    """docs/assets/diagrams/trainer_step.svg is generated by docs/_hooks/trainer_step_diagram.py (committed both)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trainer_step_diagram", DOCS / "_hooks" / "trainer_step_diagram.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT.read_text() == module.svg(), "run `python docs/_hooks/trainer_step_diagram.py`"


TRAINER_PAGE_SECTIONS = (
    "## Overview",
    "## Quick start",
    "## Looking deeper",
    "## Loss",
    "### Loss types",
    "## Logged metrics",
    "### Healthy values",
    "## Customization",
    "### Custom reward functions",
    "### vLLM",
    "### Multi-GPU and multi-node",
    "## Configuration reference",
)


@pytest.mark.parametrize("page", ["gnivo_trainer.md", "vimpo_trainer.md"])
def test_trainer_pages_have_the_sections_of_trls_trainer_pages(page):
    """The shape of TRL's GRPO page: overview, quick start (script, accelerate launch, runtime, a reward curve), a
    step-by-step look with the diagram, the loss, logged metrics with healthy values, customization (reward functions,
    vLLM, multi-node) and the config reference, in that order."""
    text = (DOCS / page).read_text()
    positions = []
    for heading in TRAINER_PAGE_SECTIONS:
        match = re.search(rf"^{re.escape(heading)}\b", text, re.M)
        assert match, f"{page} lacks {heading!r}"
        positions.append(match.start())
    assert positions == sorted(positions), f"{page}: sections out of TRL's order"
    quick_start = text[positions[1] : positions[2]]
    assert "accelerate launch" in quick_start and "**Expected runtime.**" in quick_start
    assert "assets/diagrams/trainer_step.svg" in text[positions[2] : positions[3]], "the diagram under Looking deeper"
    assert "assets/results/trainer_metrics/" in text, "a reward curve from the trainer-metrics study"
    assert "trainer_metrics/trainer_metrics.md" in text, "healthy values read from the study's file"


def test_embedded_examples_read_as_pages_for_users(site):
    """Every HTML page a docs page embeds (an iframe) has a heading without Python string escapes and carries no
    maintenance comments (provenance lives in the study's report)."""
    for page in sorted(site.rglob("index.html")):
        for source in re.findall(r'<iframe[^>]*\ssrc="([^"]+)"', page.read_text()):
            embedded = (page.parent / source).resolve().read_text()
            headings = re.findall(r"<h1>(.*?)</h1>", embedded, re.S)
            assert headings and not any("\\n" in h or "&#x27;" in h for h in headings), (source, headings)
            assert "<!--" not in embedded, f"{source} carries an HTML comment"
