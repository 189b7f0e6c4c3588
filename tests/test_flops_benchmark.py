"""benchmarks/flops.py at a tiny shape: the counts it reports are the counts of a real step (counted ops skipped or
computed, 1 and 2 layers extended or the whole model), and the LM-head projections per completion token of each path
are the design's (GRPO 4, GRPO with a reference 5, VIMPO 5 after issue 32 and 7 before, in TRL's CUDA layout)."""

from __future__ import annotations

import logging

import pytest
import torch

from benchmarks import flops, overhead

SHAPE = "smoke"  # V = 1024, H = 32, 2 layers
LENGTH = 16


# The reduced shapes a count is extended from, the smoke shape itself (2 layers, V = 1024) and two other points: one
# vocabulary tile as at the reduced shapes, and three 32,768-entry tiles (the last one partial) as at V = 151,936.
POINTS = [*flops.REDUCED, (2, 1024), (3, 1289), (3, 70001)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("flops")
    return {
        point: overhead.build_model_dir(directory / f"{point}", "cpu", shape_name=flops.reduced_shape(SHAPE, *point))
        for point in POINTS
    }


def _count(model_dirs, method: str, layout: str, point=(2, 1024), skip: bool = True) -> flops.StepCount:
    shape = flops.reduced_shape(SHAPE, *point)
    return flops.count_step(method, model_dirs[point], LENGTH, layout, shape, skip=skip)


@pytest.mark.parametrize(
    ("method", "expected"),
    [("grpo", 4), ("grpo+ref", 5), ("gnivo/token", 4), ("vimpo/exact", 5), ("vimpo/exact@before", 7)],
)
def test_head_projections_per_completion_token(method, expected, model_dirs):
    """Exact integers in the CUDA layout (only the completion tokens projected), every counted op computed for real;
    VIMPO after issue 32 costs exactly what GRPO with a reference model costs, in both layouts."""
    count = _count(model_dirs, method, "cuda", skip=False)
    assert count.projections() == expected
    assert not count.uncounted
    if method == "vimpo/exact":
        assert count.total == _count(model_dirs, "grpo+ref", "cuda").total
        assert _count(model_dirs, method, "cpu").total == count.total  # it never projects the prompt


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "layout"),
    [
        ("grpo+ref", "cpu"),
        ("gnivo/sequence", "cuda"),
        ("vimpo/candidate_set", "cuda"),
        ("vimpo/adaptive", "cpu"),
        ("vimpo/candidate_set@before", "cuda"),
        ("vimpo/adaptive@before", "cpu"),
    ],
)
def test_skipping_the_counted_ops_counts_what_computing_them_counts(method, layout, model_dirs):
    """The benchmark skips the counted ops (zeros of the right shape) to count a 0.5B model on a CPU: the count, op
    by op and kernel by kernel, is the one of the step computed for real."""
    skipped, computed = _count(model_dirs, method, layout), _count(model_dirs, method, layout, skip=False)
    assert skipped.by_kernel == computed.by_kernel and skipped.total > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "layout", "target"),
    [
        ("grpo+ref", "cpu", (3, 1289)),
        ("vimpo/candidate_set@before", "cpu", (3, 1289)),
        ("grpo+ref", "cuda", (3, 70001)),
        ("vimpo/exact", "cuda", (3, 70001)),
        ("vimpo/exact@before", "cpu", (3, 70001)),
    ],
)
def test_counts_are_affine_in_the_layers_and_the_vocabulary(method, layout, target, model_dirs):
    """The count at 3 layers and V = 1289 or 70,001 (three vocabulary tiles of TRL's kernels and of VIMPO's pass, the
    last one partial), op by op and kernel by kernel, is the one extended from the reduced shapes, whose vocabularies
    fit one tile: how the benchmark counts the 24-layer, 151,936-entry shape."""
    counted = {point: _count(model_dirs, method, layout, point) for point in flops.REDUCED}
    extended = flops.StepCount.extended(counted, *target)
    direct = _count(model_dirs, method, layout, target)
    assert extended.by_kernel == direct.by_kernel and extended.head > 0
    assert extended.projections() == direct.projections()


@pytest.mark.slow
def test_report_has_both_layouts_and_the_direct_check(tmp_path):
    output = tmp_path / "flops.md"
    methods = ["grpo+ref", "vimpo/exact", "vimpo/exact@before"]
    argv = ["--shape", SHAPE, "--lengths", "16", "--methods", *methods, "--check-direct", "--output", str(output)]
    logger, threads = logging.getLogger("gnivo_trl"), torch.get_num_threads()
    level = logger.level
    assert flops.main([*argv, "--threads", str(threads + 1)]) == 0
    # The process is left as it was: later tests in it see gnivo_trl's warnings and their own thread count.
    assert (logger.level, torch.get_num_threads()) == (level, threads)
    report = output.read_text()
    for title in flops.LAYOUT_TITLES.values():
        assert f"## {title}" in report
    assert "| grpo+ref | - | 5.000 | 1.0000 |" in report  # the CUDA layout's table comes first
    assert "| vimpo/exact | after | 5.000 | 1.0000 |" in report and "| vimpo/exact | before | 7.000 |" in report
    assert report.count("| yes |") == 3 and "**no**" not in report
    assert "The direct counts of the whole model at the end are equal to the extended ones" in report
    for layout in flops.LAYOUTS:  # the op list by kernel, in both layouts
        assert f"### vimpo/exact (after), {layout} layout" in report
    assert "have no formula: none." in report
