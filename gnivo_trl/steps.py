"""Unit boundaries of GN-IVO's prefix units beyond single tokens.

* `gnivo_prefix_unit="step"`: reasoning-step boundaries from the decoded completion tokens (`step_unit_ends`).
* `gnivo_prefix_unit="turn"`: assistant-turn boundaries from the loss mask of a multi-turn (tool-calling) rollout
  (`turn_unit_ends`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["TokenTextCache", "step_unit_ends", "turn_unit_ends"]


class TokenTextCache:
    """Decoded text of single token ids, decoded once per id and cached.

    Decoding each completion in full at every generation round would repeat the same work on the same few thousand
    token ids; a per-id cache makes step detection a dictionary lookup per token. A byte-level BPE token that holds a
    fragment of a multi-byte character decodes to a replacement character, which never matches an ASCII delimiter.
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def __call__(self, token_ids: Sequence[int]) -> list[str]:
        missing = sorted({int(t) for t in token_ids} - self._text.keys())
        if missing:
            decoded = self._tokenizer.batch_decode(
                [[t] for t in missing], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            self._text.update(zip(missing, decoded))
        return [self._text[int(t)] for t in token_ids]


def step_unit_ends(
    completion_ids: torch.Tensor,
    mask: torch.Tensor,
    token_texts: TokenTextCache,
    delimiter: str,
) -> torch.Tensor:
    """Mark the tokens that close a reasoning step.

    A token closes a step when an occurrence of `delimiter` in the decoded completion ends inside that token's text,
    so a delimiter split over two tokens (`"\\n"` + `"\\n"`) is found as well as one inside a merged token
    (`".\\n\\n"`). Occurrences are found left to right without overlap. Only unmasked tokens are decoded; the last
    unmasked token is added as a boundary by the loss itself
    ([`gnivo_trl.losses.unit_boundaries`][gnivo_trl.losses.unit_boundaries]).

    Args:
        completion_ids: `(B, T)` token ids.
        mask: `(B, T)` 0/1 loss mask.
        token_texts: decoder of single token ids (a `TokenTextCache`).
        delimiter: non-empty step delimiter, e.g. `"\\n\\n"`.

    Returns:
        `(B, T)` bool tensor on the device of `completion_ids`.
    """
    if not delimiter:
        raise ValueError("The step delimiter must be a non-empty string.")
    ids = completion_ids.detach().cpu().numpy()
    valid = mask.detach().bool().cpu().numpy()
    ends = np.zeros(ids.shape, dtype=bool)
    for row in range(ids.shape[0]):
        positions = np.flatnonzero(valid[row])
        if positions.size == 0:
            continue
        pieces = token_texts(ids[row, positions].tolist())
        text = "".join(pieces)
        if delimiter not in text:
            continue
        # piece_end[k] = character offset just past token k in the joined text
        piece_end = np.cumsum([len(p) for p in pieces])
        start = text.find(delimiter)
        while start != -1:
            last_char = start + len(delimiter) - 1
            ends[row, positions[np.searchsorted(piece_end, last_char, side="right")]] = True
            start = text.find(delimiter, start + len(delimiter))
    return torch.from_numpy(ends).to(completion_ids.device)


def turn_unit_ends(mask: torch.Tensor) -> torch.Tensor:
    """Mark the tokens that close an assistant turn of a multi-turn rollout.

    In a completion built by TRL's tool loop (`tools=` or `environment_factory=`) the loss mask
    (`completion_mask * tool_mask`) is 1 on the model's own tokens and 0 on the tool output that TRL appended
    between two assistant turns. A turn closes at the last unmasked token before each run of masked tokens, which
    is the last model token before a tool response; the trailing padding is such a run too, so the completion's last
    unmasked token closes the final turn ([`gnivo_trl.losses.unit_boundaries`][gnivo_trl.losses.unit_boundaries] adds
    it in any case). A row without tool output therefore has exactly one turn: turn units then equal `"sequence"`
    units.

    Vectorised (one comparison of each position with the next), no loop over positions or rows.

    Args:
        mask: `(B, T)` 0/1 loss mask (any dtype): 1 on model tokens, 0 on tool output and padding.

    Returns:
        `(B, T)` bool tensor on the device of `mask`, True where an unmasked token is followed by a masked
        position or by the end of the row.
    """
    valid = mask.bool()
    next_valid = torch.nn.functional.pad(valid[:, 1:], (0, 1), value=False)  # past the last column counts as masked
    return valid & ~next_valid
