// Layout checks a program can make in a rendered page of the docs site (tests/test_docs_site.py injects this script
// into every page it serves). After the page and KaTeX have rendered, the findings are appended to the DOM as JSON, in a
// hidden "pre" element with the id "layout-report", which `chromium --dump-dom` returns.
window.addEventListener("load", () => setTimeout(() => {
  const report = { brokenIdentifiers: [], wideEquations: [], wideCode: [], wideTables: [] };
  const column = (document.querySelector(".md-content__inner") || document.body).getBoundingClientRect();
  // The number of lines an element's text occupies.
  const lines = (element) => {
    const range = document.createRange();
    range.selectNodeContents(element);
    return new Set([...range.getClientRects()].filter((r) => r.width > 0).map((r) => Math.round(r.bottom))).size;
  };
  // An identifier (inline code without whitespace) in a table is on one line.
  for (const code of document.querySelectorAll(".md-typeset table code")) {
    const text = code.textContent.trim();
    if (text && !/\s/.test(text) && lines(code) > 1) report.brokenIdentifiers.push(text);
  }
  // A display equation is no wider than the content column: nothing to scroll, nothing past the column's edge.
  for (const display of document.querySelectorAll(".md-typeset .katex-display")) {
    const content = display.querySelector(".katex-html") || display;
    const over = Math.max(display.scrollWidth - display.clientWidth, content.getBoundingClientRect().right - column.right);
    const tex = display.querySelector("annotation");
    if (over > 1) report.wideEquations.push({ tex: (tex ? tex.textContent : "").trim().slice(0, 100), over: Math.round(over) });
  }
  // A code block shows its longest line without scrolling.
  for (const code of document.querySelectorAll(".md-typeset pre > code")) {
    const over = code.scrollWidth - code.clientWidth;
    const longest = code.textContent.split("\n").reduce((a, b) => (b.length > a.length ? b : a), "");
    if (over > 1) report.wideCode.push({ line: longest.slice(0, 120), over: Math.round(over) });
  }
  // A table fits the column (Material would scroll it sideways, hiding its last columns).
  for (const table of document.querySelectorAll(".md-typeset table")) {
    const over = table.getBoundingClientRect().right - column.right;
    const header = (table.querySelector("tr") || table).textContent.trim().replace(/\s+/g, " ");
    if (over > 1) report.wideTables.push({ header: header.slice(0, 80), over: Math.round(over) });
  }
  const out = document.createElement("pre");
  out.id = "layout-report";
  out.hidden = true;
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
}, 500));
