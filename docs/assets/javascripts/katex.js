// Render the equations pymdownx.arithmatex marks (\( ... \) inline, \[ ... \] display) with the site's own KaTeX,
// on every page load, including Material's instant navigation (document$).
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    // Only what pymdownx.arithmatex emits: a dollar sign in prose or in a docstring stays a dollar sign.
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
