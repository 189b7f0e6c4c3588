"""FLOPs of one training step of GRPO, GN-IVO and VIMPO, counted with torch's ``FlopCounterMode`` (issue 32).

One *step* = scoring (``_generate_and_score_completions`` with a fixed-output generation stub: every no-grad forward a
method runs per generation batch, e.g. GRPO's reference forward) + ``compute_loss`` + ``backward``; generation itself
is excluded. The model is randomly initialised at the Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151,936, tied embeddings, float32), gradient checkpointing on, 2 groups x 2 completions
of exactly T tokens after a 32-token prompt, in one micro-batch (``benchmarks/overhead.py``'s ``build_trainer``).

How it counts:

* ``torch.utils.flop_counter.FlopCounterMode`` with formulas added for the ops it misses here: ``aten.addmm_`` (the
  in-place GEMM of ``trl.kernels.chunked_logprob._addmm_fp32``, 2 of the 3 GEMMs of TRL's fused-head backward and of
  VIMPO's) and CPU attention (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, with torch's SDPA
  formulas: the full, non-causal score matrix, as torch counts it on CUDA). Every op seen whose name looks like a
  matrix product or attention and that has no formula is listed in the report (none at the time of writing).
* The counted ops are not computed (``SkipCountedOps``): their outputs are zeros of the shape their meta kernel gives,
  so a 0.5B-parameter step runs in seconds on a CPU. What runs and with which shapes depends on the inputs' masks
  only, not on values, so the count is the one of a real step; ``tests/test_flops_benchmark.py`` checks that both
  counts agree at a tiny shape.
* A step's count is affine in the number of decoder layers ``L`` (they all have the same shapes) and in the
  vocabulary size ``V`` (the LM head's FLOPs are ``2 N H`` per vocabulary entry, however the vocabulary is tiled, and
  nothing else depends on ``V``), with no cross term: ``F(L, V) = F(1, V1) + (L - 1) (F(2, V1) - F(1, V1)) +
  (V - V1) (F(1, V2) - F(1, V1)) / (V2 - V1)``, exactly, op by op. The step is counted at ``(L, V) = (1, 1031)``,
  ``(2, 1031)`` and ``(1, 1543)``, everything else at full size (hidden size, heads, intermediate size, lengths,
  batch), and extended to the 24 layers and 151,936 entries of the shape: a 0.5B-parameter step with 151,936-wide
  folds takes minutes and 10 GB on a CPU, these take seconds. ``--check-direct`` adds direct counts of the whole
  model for a few cells to the report (they must be equal; about 4 minutes and 10 GB each at T=512), ``--direct``
  counts every cell that way; the tests check the identity at a tiny shape, with vocabularies of one and of
  three 32,768-entry tiles.
* Each counted op is attributed to the kernel it ran in (the first frame of TRL's ``chunked_logprob`` /
  ``chunked_divergence`` kernels, of ``gnivo_trl.scoring``'s pass of both heads, or of the old candidate-set
  projection, found on the Python stack; everything else is the backbone) and is an LM-head projection when one of its
  operands has a vocabulary dimension (``V``, TRL's 32,768-entry tile or the last tile's width). Head FLOPs divided by
  ``2 V H`` per completion token give the projections per completion token.

Layouts: TRL's fused LM head (GRPO's, GN-IVO's and VIMPO's before issue 32) projects only the valid completion
positions where Triton runs (``_use_triton(device)``: CUDA), and every position, prompt included, elsewhere (the CPU
layout). Both are counted here on CPU by forcing ``trl.trainer.utils._use_triton`` (the name ``add_fused_lm_head``
reads to choose the layout; the kernels keep their torch folds). VIMPO's pass of both heads projects the valid
completion tokens in either layout.

Before and after: ``vimpo/...@before`` is VIMPO's scoring before issue 32, pinned in ``benchmarks/vimpo_before.py``
(the code of commit 19d62dc, bound to the same trainer): TRL's fused forward of each model and both heads projected
again by the KL kernel. GRPO's and GN-IVO's paths did not change.

Usage (from the repository root, with the project's ``.venv/bin/python``)::

    nice python -m benchmarks.flops --check-direct   # writes benchmarks/results/flops/flops.md
    python -m benchmarks.flops --shape smoke --lengths 16 --output /tmp/flops.md   # the tiny shape of the tests
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import re
import shlex
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import overhead, reporting

STUDY = "flops"
LENGTHS = [512, 2048]
PROMPT_LENGTH = 32
NUM_GROUPS = 2
GROUP_SIZE = 2
SHAPE = "qwen2-0.5b"
VOCAB_TILE = 32768  # TRL's vocabulary tile (chunked_logprob's chunk_size, chunked_divergence's VOCAB_CHUNK_SIZE)
LAYOUTS = {"cuda": True, "cpu": False}  # layout -> whether TRL's fused head projects only the valid positions
LAYOUT_TITLES = {
    "cuda": "CUDA layout (TRL's fused head projects only the valid completion positions)",
    "cpu": "CPU layout (TRL's fused head projects every position, prompt included)",
}
METHODS = [
    "grpo",
    "grpo+ref",
    "gnivo/token",
    "gnivo/sequence",
    "vimpo/exact",
    "vimpo/candidate_set",
    "vimpo/k2",
    "vimpo/k3",
    "vimpo/adaptive",
]
BASELINE = "grpo+ref"
MATMUL_LIKE = re.compile(r"mm|matmul|linear|attention|conv|einsum|dot|mv\b|addmv|bilinear")
# overhead.py's tiny shapes, for the tests; registered here as gpu_check.py registers "smoke".
overhead.MODEL_SHAPES.setdefault(
    "smoke",
    dict(
        vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    ),
)  # fmt: skip


# The (layers, vocabulary) points a count is extended from: prime vocabularies, so that no other dimension of a step
# (hidden 896, intermediate 4864, token counts) can be taken for a vocabulary dimension.
REDUCED = ((1, 1031), (2, 1031), (1, 1543))


def reduced_shape(shape_name: str, layers: int, vocab: int | None = None) -> str:
    """The name of ``shape_name`` with ``layers`` decoder layers (and ``vocab`` entries), registered in
    ``overhead.MODEL_SHAPES``."""
    shape = dict(overhead.MODEL_SHAPES[shape_name], num_hidden_layers=layers)
    shape["vocab_size"] = vocab or shape["vocab_size"]
    name = f"{shape_name}-{layers}-layers-{shape['vocab_size']}-vocab"
    overhead.MODEL_SHAPES.setdefault(name, shape)
    return name


def all_methods() -> list[str]:
    """Every method, VIMPO's before and after issue 32."""
    vimpo = [method for method in METHODS if method.startswith("vimpo/")]
    return METHODS + [method + overhead.BEFORE for method in vimpo]


def extra_formulas() -> dict:
    """FLOP formulas for the ops ``FlopCounterMode`` misses here (see the module docstring)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    # torch's own formulas (registered shape-wrapped; FlopCounterMode wraps a custom mapping itself).
    return {
        aten.addmm_: flop_counter.addmm_flop.__wrapped__,
        aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop.__wrapped__,
    }


def _kernel_of_caller() -> str:
    """The kernel an op runs in, from the Python stack (see the module docstring)."""
    frame = sys._getframe(2)
    while frame is not None:
        path, name = frame.f_code.co_filename.replace("\\", "/"), frame.f_code.co_name
        if path.endswith("trl/kernels/chunked_logprob.py") and name in ("forward", "backward"):
            return f"TRL fused log-prob kernel, {name}"
        if path.endswith("trl/kernels/chunked_divergence.py") and name in ("forward", "backward"):
            return f"TRL divergence (KL) kernel, {name}"
        if path.endswith("gnivo_trl/scoring.py") and name in ("forward", "backward"):
            return f"VIMPO's pass of both heads, {name}"
        if path.endswith("benchmarks/vimpo_before.py") and name == "_log_probs":
            return "old candidate-set KL log-softmax"
        frame = frame.f_back
    return "backbone"


@dataclass
class StepCount:
    """FLOPs of one step, by (kernel, op, whether an LM-head projection)."""

    method: str
    layout: str
    length: int
    completion_tokens: int
    vocab: int
    hidden: int
    by_kernel: dict[tuple[str, str, bool], int] = field(default_factory=dict)
    uncounted: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())

    @property
    def head(self) -> int:
        return sum(flops for (_, _, is_head), flops in self.by_kernel.items() if is_head)

    @staticmethod
    def extended(counts: dict[tuple[int, int], StepCount], layers: int, vocab: int) -> StepCount:
        """The count of the model with ``layers`` layers and ``vocab`` entries from the counts at ``(1, V1)``,
        ``(2, V1)`` and ``(1, V2)`` (``counts``, keyed by (layers, vocabulary); see the module docstring)."""
        (v1, v2) = sorted({v for _, v in counts})
        base, deeper, wider = counts[(1, v1)], counts[(2, v1)], counts[(1, v2)]
        by_kernel = {}
        for key in set(base.by_kernel) | set(deeper.by_kernel) | set(wider.by_kernel):
            one, two, wide = (count.by_kernel.get(key, 0) for count in (base, deeper, wider))
            per_entry, remainder = divmod(wide - one, v2 - v1)
            by_kernel[key] = one + (layers - 1) * (two - one) + (vocab - v1) * per_entry
            if remainder or by_kernel[key] < 0:
                raise RuntimeError(f"{base.method}: {key} is not affine in the layers and the vocabulary")
        if len({count.completion_tokens for count in counts.values()}) != 1:
            raise RuntimeError(f"{base.method}: the counts saw different completion tokens")
        uncounted = set().union(*(count.uncounted for count in counts.values()))
        return StepCount(
            base.method, base.layout, base.length, base.completion_tokens, vocab, base.hidden, by_kernel, uncounted
        )

    def projections(self, flops: int | None = None) -> float:
        """Head FLOPs (all, or ``flops``) in LM-head projections per completion token (``2 V H`` each)."""
        flops = self.head if flops is None else flops
        return flops / (2 * self.vocab * self.hidden * self.completion_tokens)


def _counter_class():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    class KernelFlopCounter(FlopCounterMode):
        """``FlopCounterMode`` that also attributes each counted op to its kernel and to head or backbone."""

        def __init__(self, vocab_dims: set[int]):
            super().__init__(display=False, custom_mapping=extra_formulas())
            self.vocab_dims = vocab_dims
            self.by_kernel: dict[tuple[str, str, bool], int] = defaultdict(int)

        def _count_flops(self, func_packet, out, args, kwargs):
            if func_packet in self.flop_registry:
                flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                shapes = [arg.shape for arg in args if isinstance(arg, torch.Tensor)]
                is_head = "attention" not in str(func_packet) and any(
                    dim in self.vocab_dims for shape in shapes for dim in shape
                )
                self.by_kernel[(_kernel_of_caller(), str(func_packet).removeprefix("aten."), is_head)] += flops
            return super()._count_flops(func_packet, out, args, kwargs)

    return KernelFlopCounter


class SkipCountedOps:
    """A dispatch mode that returns zeros, shaped by the op's meta kernel, instead of computing the ops that the FLOP
    counter counts (in place: the input unchanged; ``out=``: ``out`` zeroed); it records ops that look like matrix
    products or attention and have no formula. Enter it before the counter, so that the counter sees every op first."""

    def __init__(self, registry):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return outer.dispatch(func, args, kwargs or {})

        self.registry = registry
        self.uncounted: set[str] = set()
        self.mode = _Mode()

    def dispatch(self, func, args, kwargs):
        import torch
        from torch.utils._pytree import tree_map

        packet = func._overloadpacket
        if packet not in self.registry:
            if MATMUL_LIKE.search(str(packet).removeprefix("aten.")):
                self.uncounted.add(str(packet))
            return func(*args, **kwargs)
        if func._schema.name.endswith("_"):  # in place: acc += a @ b with a @ b taken as 0
            return args[0]
        if "out" in kwargs:
            return kwargs["out"].zero_()
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        meta_args, meta_kwargs = tree_map(
            lambda value: value.to("meta") if isinstance(value, torch.Tensor) else value, (args, kwargs)
        )
        result = func(*meta_args, **meta_kwargs)
        return tree_map(
            lambda value: (
                torch.zeros(value.shape, dtype=value.dtype, device=device)
                if isinstance(value, torch.Tensor)
                else value
            ),
            result,
        )

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@contextlib.contextmanager
def forced_layout(layout: str):
    """TRL's fused-head layout of ``layout`` (``LAYOUTS``), whatever the device: ``add_fused_lm_head`` reads
    ``trl.trainer.utils._use_triton`` to choose it."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: LAYOUTS[layout]
    try:
        yield
    finally:
        trl_utils._use_triton = original


def count_step(
    method: str, model_dir: str, length: int, layout: str, shape_name: str = SHAPE, skip: bool = True
) -> StepCount:
    """FLOPs of one step of ``method`` (a key of ``all_methods()``) at ``length`` completion tokens in ``layout``;
    ``skip=False`` computes the counted ops instead of skipping them (the tests compare both)."""
    import torch
    from torch.utils.flop_counter import flop_registry

    shape = overhead.MODEL_SHAPES[shape_name]
    vocab, hidden = shape["vocab_size"], shape["hidden_size"]
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, rows = overhead.build_trainer(
            method,
            model_dir,
            "cpu",
            length,
            output_dir,
            shape_name=shape_name,
            num_completions=GROUP_SIZE,
            prompt_length=PROMPT_LENGTH,
            num_groups=NUM_GROUPS,
        )
        counter = _counter_class()({vocab, VOCAB_TILE, vocab % VOCAB_TILE} - {0})
        skipper = SkipCountedOps(set(flop_registry) | set(extra_formulas()))
        with forced_layout(layout), skipper if skip else contextlib.nullcontext(), counter:
            batch = trainer._generate_and_score_completions(rows)
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
        count = StepCount(
            method,
            layout,
            length,
            int(batch["completion_mask"].sum()),
            vocab,
            hidden,
            dict(counter.by_kernel),
            skipper.uncounted,
        )
        if counter.get_total_flops() != count.total:  # the attribution covers every counted op
            raise RuntimeError(f"attributed {count.total} of {counter.get_total_flops()} FLOPs")
        del trainer, batch, loss
        gc.collect()
        torch.manual_seed(0)
    return count


def run(
    lengths: list[int],
    methods: list[str],
    layouts: list[str],
    shape_name: str,
    workdir: Path,
    direct: bool = False,
) -> list[StepCount]:
    """Every (length, layout, method) count of ``shape_name``: extended from ``REDUCED`` shapes, or direct."""
    import torch

    shape = overhead.MODEL_SHAPES[shape_name]
    points = [None] if direct else REDUCED
    shapes = {point: shape_name if direct else reduced_shape(shape_name, *point) for point in points}
    model_dirs = {}
    for point, name in shapes.items():
        torch.manual_seed(0)
        model_dirs[point] = overhead.build_model_dir(workdir / name, "cpu", shape_name=name)
    counts = []
    for length in lengths:
        for layout in layouts:
            for method in methods:
                counted = {
                    point: count_step(method, model_dirs[point], length, layout, name)
                    for point, name in shapes.items()
                }
                if direct:
                    count = counted[None]
                else:
                    count = StepCount.extended(counted, shape["num_hidden_layers"], shape["vocab_size"])
                print(
                    f"T={length:5d} {layout:4s} {method:26s} {count.total / 1e12:10.4f} TFLOP  "
                    f"head {count.projections():.3f} projections/token",
                    flush=True,
                )
                counts.append(count)
    return counts


def _label(method: str) -> tuple[str, str]:
    """(method, path) of a method key."""
    if method.endswith(overhead.BEFORE):
        return method.removesuffix(overhead.BEFORE), "before"
    return method, "after" if method.startswith("vimpo/") else "-"


def _extension_note(shape: dict, checks: list[tuple[StepCount, StepCount]]) -> str:
    """How the counts were extended from reduced shapes, and what checks the extension."""
    note = (
        f"Counted at (decoder layers, vocabulary) = {', '.join(map(str, REDUCED))}, everything else at full size, and "
        f"extended to ({shape['num_hidden_layers']}, {shape['vocab_size']:,}) with `F(L, V) = F(1, V1) + (L - 1) "
        "(F(2, V1) - F(1, V1)) + (V - V1) (F(1, V2) - F(1, V1)) / (V2 - V1)`, op by op and kernel by kernel: the "
        "decoder layers all have the same shapes, and the LM head's matrix products cost `2 N H` per vocabulary entry "
        "however the vocabulary is tiled (nothing else depends on V). The extension refuses a count that is not "
        "affine (a remainder or a negative count); `tests/test_flops_benchmark.py` checks it at a tiny shape against "
        "direct counts of more layers and of vocabularies of one and of several 32,768-entry tiles. "
    )
    if not checks:
        return note + "No direct count of the whole model was made for this report."
    if all(extended.by_kernel == counted.by_kernel for extended, counted in checks):
        return note + "The direct counts of the whole model at the end are equal to the extended ones, op by op."
    return note + "**Some direct counts of the whole model at the end differ from the extended ones.**"


def write_report(
    counts: list[StepCount],
    lengths,
    layouts,
    shape_name: str,
    command: str,
    output: Path,
    direct: bool = False,
    checks: list[tuple[StepCount, StepCount]] = (),
) -> str:
    """The Markdown report; ``checks``: (extended, direct) count pairs of the same cell."""
    find = {(c.method, c.layout, c.length): c for c in counts}
    methods = list(dict.fromkeys(c.method for c in counts))
    shape = overhead.MODEL_SHAPES[shape_name]
    uncounted = sorted(set().union(*(c.uncounted for c in counts)))
    lines = [
        "# FLOPs of one training step: GRPO, GN-IVO and VIMPO",
        "",
        f"Command: `{command}`",
        "",
        f"Model: Qwen2 architecture, random initialisation, {shape}, tied embeddings, float32, gradient checkpointing "
        f"on. Inputs: {NUM_GROUPS} groups x {GROUP_SIZE} completions of exactly T tokens after a {PROMPT_LENGTH}-token "
        "prompt, in one micro-batch. One step = scoring + loss + backward (generation excluded). Counted with "
        "`torch.utils.flop_counter.FlopCounterMode` plus formulas for `aten.addmm_` and CPU attention (see "
        "`benchmarks/flops.py`); counts are exact and do not depend on the machine. A projection is `2 V H` FLOPs "
        "per completion token (V the vocabulary, H the hidden size). `before`: VIMPO's scoring before issue 32 "
        "(`benchmarks/vimpo_before.py`, the code of commit 19d62dc); `after`: one float32 pass of both heads "
        "(`gnivo_trl.scoring.policy_reference_scores`). "
        + ("Counted on the model itself." if direct else _extension_note(shape, checks)),
        "",
        "Ops that look like matrix products or attention and have no formula: "
        + (", ".join(f"`{name}`" for name in uncounted) if uncounted else "none")
        + ".",
    ]
    for layout in layouts:
        header = " / ".join(f"T={t}" for t in lengths)
        lines += ["", f"## {LAYOUT_TITLES[layout]}", ""]
        lines += [
            f"| method | path | LM-head projections per completion token ({header}) | FLOPs / GRPO with a "
            f"reference ({header}) |",
            "|---|---|---|---|",
        ]
        for method in methods:
            name, path = _label(method)
            cells = [find[(method, layout, t)] for t in lengths]
            projections = " / ".join(f"{c.projections():.3f}" for c in cells)
            ratios = " / ".join(f"{c.total / find[(BASELINE, layout, c.length)].total:.4f}" for c in cells)
            lines.append(f"| {name} | {path} | {projections} | {ratios} |")
    lines += [
        "",
        "## Absolute counts",
        "",
        "| method | path | layout | T | total TFLOP | LM head TFLOP | rest TFLOP |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for layout in layouts:
        for length in lengths:
            for method in methods:
                c = find[(method, layout, length)]
                name, path = _label(method)
                lines.append(
                    f"| {name} | {path} | {layout} | {length} | {c.total / 1e12:.4f} | {c.head / 1e12:.4f} | "
                    f"{(c.total - c.head) / 1e12:.4f} |"
                )
    length = lengths[0]
    for layout in layouts:
        lines += [
            "",
            f"## Where each projection goes (T={length}, {LAYOUT_TITLES[layout]})",
            "",
            "Every counted op, by the kernel it ran in; `head` marks LM-head projections (an operand with a "
            "vocabulary dimension). GFLOP, and for head ops the projections per completion token.",
        ]
        for method in methods:
            c = find[(method, layout, length)]
            name, path = _label(method)
            lines += [
                "",
                f"### {name} ({path}), {layout} layout",
                "",
                "| kernel | op | head | GFLOP | projections per completion token |",
                "|---|---|---|---|---|",
            ]
            by_kernel = sorted(c.by_kernel.items(), key=lambda item: (not item[0][2], item[0]))
            for (kernel, op, is_head), flops in by_kernel:
                share = f"{c.projections(flops):.3f}" if is_head else ""
                lines.append(f"| {kernel} | {op} | {'head' if is_head else ''} | {flops / 1e9:,.3f} | {share} |")
    if checks:
        lines += [
            "",
            "## Direct counts of the whole model",
            "",
            "The same cells counted on the whole model, against the count extended from the reduced shapes.",
            "",
            "| method | path | layout | T | direct TFLOP | extended TFLOP | equal |",
            "|---|---|---|---|---|---|---|",
        ]
        for extended, counted in checks:
            name, path = _label(counted.method)
            equal = "yes" if counted.by_kernel == extended.by_kernel else "**no**"
            lines.append(
                f"| {name} | {path} | {counted.layout} | {counted.length} | {counted.total / 1e12:.6f} | "
                f"{extended.total / 1e12:.6f} | {equal} |"
            )
    report = reporting.with_provenance("\n".join(lines) + "\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    return report


@contextlib.contextmanager
def counting_settings(threads: int):
    """``threads`` torch threads and the ``gnivo_trl`` loggers at ERROR (VIMPO's beta x length warning would come at
    every trainer) while counting; both restored after, since the tests call ``main`` in their own process."""
    import torch

    logger = logging.getLogger("gnivo_trl")
    level, previous_threads = logger.level, torch.get_num_threads()
    logger.setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        logger.setLevel(level)
        torch.set_num_threads(previous_threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--methods", nargs="+", default=all_methods(), choices=all_methods())
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--shape", default=SHAPE, choices=list(overhead.MODEL_SHAPES))
    parser.add_argument("--direct", action="store_true", help="count the whole model, not 1 and 2 layers extended")
    parser.add_argument(
        "--check-direct",
        nargs="*",
        default=None,
        help="also count these methods (default: grpo+ref, vimpo/exact and vimpo/exact@before) on the whole model, "
        "at the first length in the first layout, and report whether they equal the extended counts",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    reporting.provenance()  # the code this process runs, recorded now: later commits do not change it
    if BASELINE not in args.methods:
        parser.error(f"--methods must include the baseline {BASELINE}")
    checks = []
    with counting_settings(args.threads), tempfile.TemporaryDirectory() as workdir:
        counts = run(args.lengths, args.methods, args.layouts, args.shape, Path(workdir), args.direct)
        if args.check_direct is not None and not args.direct:
            default = [BASELINE, "vimpo/exact", "vimpo/exact" + overhead.BEFORE]
            checked = args.check_direct or [method for method in default if method in args.methods]
            if not set(checked) <= set(args.methods):
                parser.error("--check-direct methods must be among --methods")
            length, layout = args.lengths[0], args.layouts[0]
            direct = run([length], checked, [layout], args.shape, Path(workdir) / "direct", direct=True)
            find = {(c.method, c.layout, c.length): c for c in counts}
            checks = [(find[(c.method, c.layout, c.length)], c) for c in direct]
    output = args.output or reporting.results_dir(STUDY) / "flops.md"
    command = "python -m benchmarks.flops " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = write_report(counts, args.lengths, args.layouts, args.shape, command.strip(), output, args.direct, checks)
    print(report)
    return 0 if all(extended.by_kernel == counted.by_kernel for extended, counted in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
