"""The documentation site builds with ``mkdocs build --strict`` and renders in a real browser as a reader sees it.

The site is served on 127.0.0.1 and three pages are opened in headless Chromium (Debian's package, installed by
``make chromium``; without it these tests fail, they do not skip). The home page, the VIMPO trainer page and the
credit example page are checked the way a reader would notice a problem. Equations must be typeset by KaTeX, with no
raw ``$$`` or ``\\(`` left in the text. Tables must be present. Every image and embedded page must load from the site
itself, and the screenshot must not be blank. ``make docs-screenshots`` copies the screenshots to
``docs/assets/screenshots/``, where the docs show them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "assets" / "screenshots"

# The docs sources (pages, their images, mkdocs.yml) are in the repository, not in the sdist (MANIFEST.in): the site is
# built and checked from a checkout, as CI does.
pytestmark = pytest.mark.skipif(
    not (ROOT / "mkdocs.yml").is_file(), reason="the docs sources are not part of the sdist; run from a checkout"
)
WIDTH = 1280

# Page, the screenshot's height (from the top: down to the VIMPO page's loss and metrics, the credit page's embedded
# example), and what it must render: at least this many typeset equations, tables, images and embedded pages.
PAGES = {
    "home": ("index.html", 1500, dict(equations=0, tables=0, images=0, frames=0)),
    "vimpo_trainer": ("vimpo_trainer/index.html", 3300, dict(equations=20, tables=5, images=0, frames=0)),
    "credit": ("credit/index.html", 2300, dict(equations=3, tables=0, images=1, frames=1)),
}


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
    """The built site over HTTP on 127.0.0.1 (KaTeX's fonts do not load from file:// URLs)."""

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

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
    assert "<code>vimpo_adaptive_actor_eps</code>" in vimpo and "<code>vimpo_kl_estimator</code>" in vimpo
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
