"""Peak memory of VIMPO's exact-KL step (docs/algorithms.md#vimpo-scores): chunking must keep it well under a naive materialisation.

Runs ``benchmarks/vimpo_kl_memory.py``'s measurement at a vocabulary of 32k and 512 tokens: the naive reference
keeps the full (N, V) logits of both models, both float32 log-softmaxes and their difference; VIMPOTrainer's path
(``gnivo_trl.scoring.policy_reference_scores``: one float32 pass of both heads) runs the KL in 4 chunks of 128
tokens. Each variant runs in a fresh process and reports its peak
resident-set growth (see the benchmark's docstring for the method); the two run side by side to save wall time.
This is a property of the chunking (a few ``(chunk, V)`` float32 tensors instead of several ``(N, V)``), not a
timing, so the bound is loose.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks import vimpo_kl_memory as bench

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists() or not sys.platform.startswith("linux"),
    reason="the peak-RSS measurement needs Linux /proc (clear_refs, VmHWM)",
)


def test_chunked_exact_kl_peak_memory_is_well_under_naive():
    tokens, vocab, hidden, chunk_size = 512, 32_000, 64, 128
    with ThreadPoolExecutor(max_workers=2) as pool:
        naive_future = pool.submit(bench.measure, "naive", tokens, vocab, hidden, None, 1.0, 0, 120.0)
        chunked_future = pool.submit(bench.measure, "chunked", tokens, vocab, hidden, chunk_size, 1.0, 0, 120.0)
        naive, chunked = naive_future.result(), chunked_future.result()

    one_full_tensor_mib = tokens * vocab * 4 / 2**20  # 62.5 MiB
    # The measurement is not vacuous: the naive variant holds several (N, V) float32 tensors at its peak...
    assert naive.peak_mib > 4 * one_full_tensor_mib, naive.peak_mib
    # ...and the chunked one its own two (chunk, V) tiles, plus the temporaries of TRL's torch fold on CPU (about six
    # more: zs, zt, their gap, two exponentials and their products), which benchmarks/README.md and the VIMPO page state.
    assert 2 <= bench.tiles_at_peak(chunked) < 10, bench.tiles_at_peak(chunked)
    ratio = chunked.peak_mib / naive.peak_mib
    assert ratio < 0.5, f"chunked {chunked.peak_mib:.1f} MiB vs naive {naive.peak_mib:.1f} MiB (ratio {ratio:.3f})"
    # Same numbers either way.
    assert bench.max_abs_difference(chunked, naive) < 1e-5
