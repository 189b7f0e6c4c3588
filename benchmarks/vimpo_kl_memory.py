"""Peak CPU memory of VIMPO's exact-KL scoring: the trainer's kernel path against a naive full materialisation.

VIMPO needs the exact KL(pi_theta || pi_ref) over the whole vocabulary at every completion token (docs/algorithms.md,
section 'VIMPO'). The naive way, the one of the VIMPO port in the H100 anchor measurement (``benchmarks/README.md``,
"GPU check"), materialises the full (N, V) logits of policy and reference, float32 log-softmaxes of both and their difference. ``VIMPOTrainer`` instead scores
from hidden states in one float32 pass of both heads (``gnivo_trl.scoring.policy_reference_scores``) on tiles of
``chunk_size`` tokens and 32,768 vocabulary entries, which gives both sampled-token log-probs and the KL. The pass
allocates two float32 ``(chunk, 32768)`` tiles of its own; where Triton is absent (CPU) TRL's torch fold
(``trl.kernels.chunked_divergence._stats_tile``) adds temporaries of the same size, which the report counts (peak
memory in tiles).
This script measures the peak memory of the KL both ways on CPU.

Inputs: N = batch x seq_len tokens, hidden size H, two random ``nn.Linear(H, V, bias=False)`` heads in float32
(policy and reference) applied to two random (N, H) hidden-state tensors, random labels.

Method: every variant runs in a fresh Python process. The process builds the inputs, warms the kernels up on a
4-token slice, resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5), reads its current RSS, runs
the variant once, and reports ``VmHWM - RSS before`` (the peak resident-set growth) from ``/proc/self/status``.
``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: on Linux a child started from a large parent inherits the
parent's high-water mark across exec, so it is wrong whenever the parent (pytest, this script) is bigger than the
child. glibc's mmap threshold is pinned to 64 KiB in the child so that freed tensors go back to the kernel at once
and the RSS follows the live tensors (the headline numbers). With glibc's defaults the threshold adapts upwards to
the size of freed blocks (up to 32 MiB), so chunk-sized tensors below that come from the heap, where fragmentation
inflates the RSS of the chunked loop on CPU by an amount that varies from run to run; those columns are reported
too, for information (on a GPU the caching allocator decides instead).

What is measured is the KL alone, what VIMPO adds to GRPO with a reference model (whose sampled-token log-probs
both methods compute with TRL's fused-head kernel). The per-token KLs of every chunked run are checked against the
naive run (max abs difference reported; the script fails above 1e-5).

Usage (from the repository root)::

    python -m benchmarks.vimpo_kl_memory            # writes benchmarks/results/overhead/vimpo_kl_memory.md
    python -m benchmarks.vimpo_kl_memory --shapes 4x512 --chunk-sizes 1024 256 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks import reporting

REPO_ROOT = reporting.REPO_ROOT
DEFAULT_OUTPUT = reporting.RESULTS / "overhead" / "vimpo_kl_memory.md"
DEFAULT_CHUNK_SIZE = 1024  # VIMPOConfig.vimpo_kl_chunk_size
KL_TOLERANCE = 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Worker side (runs in a fresh process)
# ----------------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def naive_token_statistics(policy_hidden, ref_hidden, labels, policy_head, ref_head, temperature=1.0):
    """The full-materialisation reference: (N, V) logits of both models, their float32 log-softmaxes, the difference.

    Returns ``(policy_logp, ref_logp, kl)``, each ``(N,)``.
    """
    import torch

    with torch.no_grad():
        policy_logits = policy_head(policy_hidden)  # (N, V), kept alive as a model forward would return it
        ref_logits = ref_head(ref_hidden)
        policy_log_probs = torch.log_softmax(policy_logits.float() / temperature, dim=-1)
        ref_log_probs = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
        log_ratio = policy_log_probs - ref_log_probs
        kl = (policy_log_probs.exp() * log_ratio).sum(dim=-1)
        index = labels[:, None]
        return policy_log_probs.gather(1, index).squeeze(1), ref_log_probs.gather(1, index).squeeze(1), kl


def kernel_kl(policy_hidden, ref_hidden, policy_head, ref_head, temperature, chunk_size):
    """The exact KL as ``VIMPOTrainer`` computes it (``gnivo_trl.scoring.policy_reference_scores``: one float32 pass of
    both heads on tiles of ``chunk_size`` tokens), without gradient; the same pass gives the sampled tokens'
    log-probabilities, which are left out here (GRPO with a reference model computes them too)."""
    import torch

    from gnivo_trl import scoring

    settings = scoring.FusedHeadSettings(temperature, 1.0, None, False, "base_model")
    targets = torch.zeros(policy_hidden.size(0), dtype=torch.long)
    with torch.no_grad():
        return scoring.policy_reference_scores(
            policy_hidden,
            scoring.LMHead(policy_head.weight, policy_head.bias),
            settings,
            ref_hidden,
            scoring.LMHead(ref_head.weight, ref_head.bias),
            settings,
            targets,
            chunk_size=chunk_size,
        ).kl


def _worker(args: argparse.Namespace) -> None:
    import gc

    import torch
    from torch import nn

    torch.manual_seed(args.seed)
    n_tokens = args.tokens
    policy_head = nn.Linear(args.hidden, args.vocab, bias=False)
    ref_head = nn.Linear(args.hidden, args.vocab, bias=False)
    policy_hidden = torch.randn(n_tokens, args.hidden)
    ref_hidden = torch.randn(n_tokens, args.hidden)
    labels = torch.randint(0, args.vocab, (n_tokens,))

    if args.variant == "naive":

        def run(n):
            return naive_token_statistics(
                policy_hidden[:n], ref_hidden[:n], labels[:n], policy_head, ref_head, args.temperature
            )[2]
    else:

        def run(n):
            return kernel_kl(
                policy_hidden[:n], ref_hidden[:n], policy_head, ref_head, args.temperature, args.chunk_size
            )

    run(4)  # warm-up: lazy kernel and thread-pool initialisation stays out of the measurement
    gc.collect()
    _reset_peak_rss()
    before_kib = _status_kib("VmRSS")
    kl = run(n_tokens)
    peak_kib = _status_kib("VmHWM")
    torch.save({"kl": kl}, args.save)
    print(json.dumps({"peak_growth_kib": peak_kib - before_kib, "rss_before_kib": before_kib}))


# ----------------------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    variant: str  # "naive" or "chunked"
    tokens: int
    vocab: int
    hidden: int
    chunk_size: int | None
    peak_mib: float
    outputs: dict  # the per-token KL, {"kl": (N,) tensor}


def measure(
    variant: str,
    tokens: int,
    vocab: int = 32_000,
    hidden: int = 64,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    timeout: float = 300.0,
    pin_malloc: bool = True,
) -> Measurement:
    """Run one variant in a fresh process and return its peak RSS growth (MiB) and its outputs.

    ``pin_malloc=False`` leaves glibc's adaptive mmap threshold on (see the module docstring).
    """
    import torch

    if variant not in ("naive", "chunked"):
        raise ValueError(f"variant must be 'naive' or 'chunked', got {variant!r}")
    if variant == "chunked" and chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    with tempfile.TemporaryDirectory() as tmp:
        save = Path(tmp) / "outputs.pt"
        command = [
            sys.executable,
            "-m",
            "benchmarks.vimpo_kl_memory",
            "--worker",
            "--variant",
            variant,
            "--tokens",
            str(tokens),
            "--vocab",
            str(vocab),
            "--hidden",
            str(hidden),
            "--chunk-size",
            str(chunk_size or 0),
            "--temperature",
            str(temperature),
            "--seed",
            str(seed),
            "--save",
            str(save),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        if pin_malloc:
            env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"worker failed ({shlex.join(command)}):\n{result.stdout}\n{result.stderr}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        outputs = torch.load(save)
    return Measurement(variant, tokens, vocab, hidden, chunk_size, report["peak_growth_kib"] / 1024, outputs)


def tiles_at_peak(m: Measurement) -> float:
    """A chunked run's peak memory in units of one float32 tile of the pass, ``min(N, chunk) x min(V, 32768)``."""
    # Imported here: every measured variant runs in a fresh process that imports this module, and the naive one has
    # no use for gnivo_trl, whose import (TRL, transformers) costs seconds.
    from gnivo_trl.scoring import VOCAB_TILE

    rows, columns = min(m.tokens, m.chunk_size), min(m.vocab, VOCAB_TILE)
    return m.peak_mib / (rows * columns * 4 / 2**20)


def max_abs_difference(a: Measurement, b: Measurement) -> float:
    return (a.outputs["kl"] - b.outputs["kl"]).abs().max().item()


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return (
        f"CPU: {cpu}, {os.cpu_count()} logical cores visible; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__} (threads: {torch.get_num_threads()})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["2x256", "4x512"], help="BATCHxSEQ_LEN token layouts")
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[DEFAULT_CHUNK_SIZE, 256, 128])
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    if not Path("/proc/self/clear_refs").exists():
        parser.error("this measurement needs Linux /proc (clear_refs, VmHWM)")
    rows = []
    failures = []
    for shape in args.shapes:
        batch, seq_len = (int(x) for x in shape.lower().split("x"))
        tokens = batch * seq_len
        common = dict(vocab=args.vocab, hidden=args.hidden, temperature=args.temperature, seed=args.seed)
        naive = measure("naive", tokens, **common)
        naive_default = measure("naive", tokens, pin_malloc=False, **common)
        rows.append((batch, seq_len, naive, naive_default, None))
        for chunk_size in args.chunk_sizes:
            chunked = measure("chunked", tokens, chunk_size=chunk_size, **common)
            chunked_default = measure("chunked", tokens, chunk_size=chunk_size, pin_malloc=False, **common)
            difference = max_abs_difference(chunked, naive)
            if difference > KL_TOLERANCE:
                failures.append(f"N={tokens}, chunk {chunk_size}: max |difference| {difference:.2e}")
            rows.append((batch, seq_len, chunked, chunked_default, difference))

    fv = 4 / 2**20  # MiB per float32 element
    lines = [
        "| B x T | N tokens | variant | chunk | chunks | peak MiB | ratio to naive | one (N, V) fp32 tensor, MiB "
        "| peak in (chunk, 32768) fp32 tiles | max abs diff vs naive | peak MiB, glibc default malloc | ratio, glibc default |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    naive_peak, naive_default_peak = {}, {}
    for batch, seq_len, m, m_default, difference in rows:
        if m.variant == "naive":
            naive_peak[m.tokens] = m.peak_mib
            naive_default_peak[m.tokens] = m_default.peak_mib
        chunk = "-" if m.chunk_size is None else str(m.chunk_size)
        chunks = "1 (all N)" if m.chunk_size is None else str(-(-m.tokens // m.chunk_size))
        name = "naive full materialisation" if m.variant == "naive" else "one pass of both heads (gnivo_trl.scoring)"
        if m.variant == "chunked" and m.chunk_size == DEFAULT_CHUNK_SIZE:
            name += " (VIMPOConfig default chunk)"
        ratio = m.peak_mib / naive_peak[m.tokens]
        ratio_default = m_default.peak_mib / naive_default_peak[m.tokens]
        diff = "-" if difference is None else f"{difference:.1e}"
        lines.append(
            f"| {batch} x {seq_len} | {m.tokens} | {name} | {chunk} | {chunks} | {m.peak_mib:.1f} | {ratio:.3f} "
            f"| {m.tokens * m.vocab * fv:.1f} | {'-' if m.chunk_size is None else f'{tiles_at_peak(m):.1f}'} | {diff} "
            f"| {m_default.peak_mib:.1f} | {ratio_default:.3f} |"
        )
    table = "\n".join(lines)
    command = shlex.join(["python", "-m", "benchmarks.vimpo_kl_memory", *sys.argv[1:]])
    header = (
        "# VIMPO exact-KL scoring: peak CPU memory, the one-pass kernel (chunked) vs naive\n\n"
        f"Command: `{command}`\n\n"
        f"Machine: {machine_description()}\n\n"
        f"Setup: vocabulary V = {args.vocab}, hidden size H = {args.hidden}, two random float32 "
        f"`nn.Linear(H, V, bias=False)` heads (policy, reference), temperature {args.temperature}, seed {args.seed}. "
        "Peak = growth of the resident set (VmHWM after clear_refs reset minus VmRSS before) of a fresh process "
        "per cell, inputs and weights allocated before the baseline, glibc mmap threshold pinned to 64 KiB so that "
        "RSS follows the live tensors (these figures repeat to 0.5 MiB). Last two columns: glibc's adaptive "
        "defaults, where heap fragmentation inflates the chunked loop's RSS on CPU by an amount that varies from "
        "run to run (e.g. 65 to 240 MiB for N=512, chunk 128). The naive variant keeps both (N, V) logits, "
        "both float32 log-softmaxes and their difference, then `(exp(logp) * diff).sum(-1)`. The chunked variant is "
        "VIMPOTrainer's exact KL (`gnivo_trl.scoring.policy_reference_scores`): one float32 pass of both heads on "
        "`chunk` tokens at a time. It allocates two float32 (chunk, 32768) tiles of its own (narrower when V is "
        "smaller); on CPU, where Triton is absent, TRL's torch fold (`_stats_tile`) adds temporaries of the same size, "
        "so the column 'peak in tiles' (peak MiB over one tile of min(N, chunk) x min(V, 32768) float32 values) is "
        "above 2 here; where Triton runs (CUDA, XPU) the fold works in registers. "
        f"The chunked KLs must match the naive ones to {KL_TOLERANCE:g}.\n"
    )
    report = reporting.with_provenance(f"{header}\n{table}\n")
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"written to {args.output}")
    if failures:
        print("KL MISMATCH:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
