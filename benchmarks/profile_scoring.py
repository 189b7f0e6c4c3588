"""Where a step's time goes: torch profiler tables of one phase of GRPO+ref's and VIMPO's steps.

The overhead study (``benchmarks/overhead.py``) times two phases per step: scoring (``_generate_and_score_completions``
with the fixed-output generation stub: GRPO+ref's reference forward) and the loss step (``compute_loss`` and
``backward``). This script profiles one of them (``--phase``) for the given methods on the overhead benchmark's CPU
configuration and appends, under ``--label``, a table of the operators that take the most self CPU time, with both
phases' wall times for scale.

VIMPO scores at loss time only (the reference's forward, the policy's forward and backward, one pass of both LM
heads for the log-probabilities and the exact KL), so ``--phase loss`` (the default) is where its cost is. The profiles of
earlier designs, ``results/archive/scoring_profile.md``, are of the scoring phase, where VIMPO then ran a scoring pass
of its own.

To compare two versions of the package, run it as a module from the root of a checkout of each (``python -m`` puts
the current directory first on the import path, so both the package and ``benchmarks`` come from that checkout)
with the same ``--output``::

    git worktree add /tmp/before <commit> && cp -r benchmarks/__init__.py benchmarks/reporting.py \\
        benchmarks/overhead.py benchmarks/profile_scoring.py /tmp/before/benchmarks/
    (cd /tmp/before && $OLDPWD/.venv/bin/python -m benchmarks.profile_scoring --label before \\
        --output $OLDPWD/benchmarks/results/overhead/scoring_profile.md)
    .venv/bin/python -m benchmarks.profile_scoring --label after
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import overhead, reporting  # overhead: the benchmark's model, trainers and generation stub

DEFAULT_OUTPUT = reporting.RESULTS / "overhead" / "scoring_profile.md"


def _package_revision() -> str:
    import gnivo_trl

    root = Path(gnivo_trl.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "gnivo_trl"], capture_output=True)
        return f"gnivo_trl at {commit}{' + uncommitted changes' if dirty.stdout.strip() else ''}"
    except (OSError, subprocess.CalledProcessError):
        return f"gnivo_trl {gnivo_trl.__version__}"


def profile_method(
    method: str,
    length: int,
    repeats: int,
    top: int,
    workdir: Path,
    scenario: str = "aligned",
    phase: str = "loss",
) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    model_dir = overhead.build_model_dir(workdir / "model", "cpu")
    trainer, rows = overhead.build_trainer(method, model_dir, "cpu", length, str(workdir / "out"), scenario)
    overhead.one_step(trainer, rows, "cpu")  # warm-up
    steps = [overhead.one_step(trainer, rows, "cpu") for _ in range(repeats)]
    batch = trainer._generate_and_score_completions(rows) if phase == "loss" else None
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        if phase == "loss":
            trainer.compute_loss(trainer.model, batch).backward()
        else:
            with torch.no_grad():
                trainer._generate_and_score_completions(rows)
        profiled_s = time.perf_counter() - start
    trainer.model.zero_grad(set_to_none=True)
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total_ms = sum(event.self_cpu_time_total for event in events) / 1e3
    lines = [
        f"#### `{method}`, T={length}, {phase} phase" + ("" if scenario == "aligned" else f", scenario `{scenario}`"),
        "",
        f"Scoring phase {statistics.median(s['score_s'] for s in steps):.3f} s, loss step "
        f"{statistics.median(s['loss_s'] for s in steps):.3f} s (medians of {repeats} unprofiled steps); profiled "
        f"{phase} call {profiled_s:.3f} s, {total_ms / 1e3:.3f} s of operator self time.",
        "",
        "| operator | calls | self CPU ms | share of self time |",
        "|---|---|---|---|",
    ]
    for event in events[:top]:
        self_ms = event.self_cpu_time_total / 1e3
        lines.append(f"| `{event.key}` | {event.count} | {self_ms:,.1f} | {self_ms / total_ms:.1%} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["grpo+ref", "vimpo/exact", "vimpo/k3"])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--scenario", choices=sorted(overhead.SCENARIOS), default="aligned")
    parser.add_argument("--phase", choices=["loss", "scoring"], default="loss", help="the phase profiled")
    parser.add_argument("--repeats", type=int, default=3, help="unprofiled steps whose phase times are reported")
    parser.add_argument("--top", type=int, default=12, help="operators listed per method")
    parser.add_argument("--label", required=True, help="heading of this run's section, e.g. 'before' or 'after'")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    command = "python -m benchmarks.profile_scoring " + shlex.join(argv if argv is not None else sys.argv[1:])
    section = [
        f"### {args.label}",
        "",
        f"Command: `{command.strip()}` ({_package_revision()})",
        "",
        reporting.provenance_line(),
        "",
        f"Machine: {overhead.machine_description('cpu')}",
        "",
    ]
    for method in args.methods:
        with tempfile.TemporaryDirectory() as workdir:
            section += profile_method(
                method, args.length, args.repeats, args.top, Path(workdir), args.scenario, args.phase
            )
    if not args.output.exists():
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            "# Step phase profile (CPU, torch profiler)\n\n"
            "Written by `python -m benchmarks.profile_scoring`: the overhead benchmark's CPU configuration (tiny Qwen2, "
            "hidden 64, 2 layers, vocabulary 32,000, float32, B=2 after a 128-token prompt), the operators with the "
            "most self CPU time in one call of the profiled phase (the scoring call, "
            "`_generate_and_score_completions` with the generation stub, or the loss step, `compute_loss` and "
            "`backward`).\n\n"
        )
    with args.output.open("a") as output:
        output.write("\n".join(section) + "\n")
    print("\n".join(section))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
