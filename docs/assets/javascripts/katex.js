// Render the equations pymdownx.arithmatex marks (\( ... \) inline, \[ ... \] display) with the site's own KaTeX,
// on every page load, including Material's instant navigation (document$).
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
