"""Draws docs/assets/diagrams/trainer_step.svg: where GRPO, GN-IVO and VIMPO compute in TRL's training step.

Run `python docs/_hooks/trainer_step_diagram.py` after changing what a trainer computes where; a test checks that the
committed SVG is what this script draws. The cells follow the code: TRL's `GRPOTrainer._generate_and_score_completions`
(generation, rewards), `GroupBookkeepingMixin._generate_and_score_completions` and each trainer's
`_add_group_statistics` (group quantities fixed at generation time), each trainer's `_compute_loss` (per micro-batch),
and the transformers `Trainer`'s backward, gradient clipping and optimizer step.
"""

from __future__ import annotations

import html
import textwrap
from pathlib import Path

OUT = (
    Path(__file__).resolve().parents[1]
    / "assets"
    / "diagrams"
    / "trainer_step.svg"
)

STAGES = (
    ("1. Generate", "TRL: transformers or vLLM"),
    ("2. Score the batch", "once per generation batch"),
    ("3. Loss", "_compute_loss, per micro-batch"),
)
# (row label, [(text, ours?) per stage]); text lines are wrapped, "\n" forces a break.
ROWS = (
    (
        "GRPO\n(TRL)",
        [
            ("K completions per prompt", False),
            (
                "reward functions; advantage (R − mean R) / std R per group; reference log-probs if β > 0",
                False,
            ),
            (
                "clipped ratio × advantage, token mean (+ β × KL to the reference)",
                False,
            ),
        ],
    ),
    (
        "GN-IVO",
        [
            ("TRL's, unchanged (tools and environments too)", False),
            (
                "TRL's rewards, then per group: weights w = softmax(R / α), their sum, horizon T_g, "
                "step or turn units",
                True,
            ),
            (
                "policy log-probs (TRL's fused head) → prefix log-ratios S(t) against the sampling policy → "
                "group cross-entropy to w, mean over groups",
                True,
            ),
        ],
    ),
    (
        "VIMPO",
        [
            ("TRL's, unchanged (tools and environments too)", False),
            ("TRL's rewards, then per group: value target R − mean R", True),
            (
                "both backbones, then one float32 pass of both LM heads → ρ, exact KL κ → value loss L_V; "
                "reward-free advantage, whitened → dual-clip actor loss L_A; L = L_V + c_A L_A",
                True,
            ),
        ],
    ),
)

WIDTH, LABEL, PAD, LINE, FONT = 760, 76, 8, 15, 11.5
COLUMN = (WIDTH - LABEL - PAD) / len(STAGES)
CHARS = 35  # characters per line at FONT in a column
TRL_FILL, OURS_FILL, TRL_STROKE, OURS_STROKE = (
    "#f1f1f3",
    "#e6e9fb",
    "#b9bcc4",
    "#3f51b5",
)


def _lines(text: str) -> list[str]:
    return [
        line
        for part in text.split("\n")
        for line in textwrap.wrap(part, CHARS, break_on_hyphens=False)
    ]


def _text(x: float, y: float, lines: list[str], **attributes: str) -> str:
    extra = " ".join(
        f'{name.replace("_", "-")}="{value}"'
        for name, value in attributes.items()
    )
    spans = "".join(
        f'<tspan x="{x:.0f}" dy="{LINE if i else 0}">{html.escape(line)}</tspan>'
        for i, line in enumerate(lines)
    )
    return f'<text x="{x:.0f}" y="{y:.0f}" {extra}>{spans}</text>'


def svg() -> str:
    parts, y = [], 10
    for index, (title, subtitle) in enumerate(STAGES):
        x = LABEL + PAD + index * COLUMN
        parts.append(_text(x + 4, y + 12, [title], font_weight="bold"))
        parts.append(_text(x + 4, y + 28, [subtitle], fill="#555"))
    y += 40
    for label, cells in ROWS:
        wrapped = [_lines(text) for text, _ in cells]
        height = max(len(lines) for lines in wrapped) * LINE + 2 * PAD
        parts.append(
            _text(4, y + PAD + 12, label.split("\n"), font_weight="bold")
        )
        for index, ((_, ours), lines) in enumerate(zip(cells, wrapped)):
            x = LABEL + PAD + index * COLUMN
            fill, stroke = (
                (OURS_FILL, OURS_STROKE) if ours else (TRL_FILL, TRL_STROKE)
            )
            parts.append(
                f'<rect x="{x:.0f}" y="{y}" width="{COLUMN - PAD:.0f}" height="{height}" rx="5" '
                f'fill="{fill}" stroke="{stroke}"/>'
            )
            parts.append(_text(x + PAD, y + PAD + 11, lines))
        y += height + PAD
    y += 6
    parts.append(
        f'<rect x="{LABEL + PAD:.0f}" y="{y}" width="14" height="12" rx="2" fill="{OURS_FILL}" '
        f'stroke="{OURS_STROKE}"/>'
    )
    parts.append(_text(LABEL + PAD + 20, y + 10, ["computed by gnivo-trl"]))
    parts.append(
        f'<rect x="{LABEL + PAD + 190:.0f}" y="{y}" width="14" height="12" rx="2" fill="{TRL_FILL}" '
        f'stroke="{TRL_STROKE}"/>'
    )
    parts.append(_text(LABEL + PAD + 210, y + 10, ["TRL's, unchanged"]))
    after = "4. Then the Trainer's backward, gradient clipping and optimizer step, as for GRPO."
    parts.append(_text(LABEL + PAD, y + 32, [after], fill="#555"))
    height = y + 42
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" '
        f'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif" font-size="{FONT}" '
        'fill="#222">\n'
        "<title>Where GRPO, GN-IVO and VIMPO compute in TRL's training step</title>\n"
        f"{body}\n</svg>\n"
    )


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(svg())
    print(OUT)
