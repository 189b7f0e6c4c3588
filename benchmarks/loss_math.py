"""How much of a training step the loss math itself takes, and whether ``torch.compile`` makes it cheaper.

GN-IVO's prefix sums and group softmaxes and VIMPO's reverse accumulation, whitening, value and actor losses run as
vectorized tensor operations on ``(B, T)`` log-probs (``gnivo_trl.losses``). This script times them alone (forward
and backward, on random log-probs with ragged masks, no model), plain and compiled with ``torch.compile`` (inductor),
checks that the compiled version gives the same loss and gradient (to 1e-5), and writes
``benchmarks/results/overhead/loss_math.md``. Compare its milliseconds with the step times of the overhead study
(seconds): a
kernel can only win measurably if the loss math is a measurable share of the step.

Usage::

    python -m benchmarks.loss_math                       # B=16 (2 groups of K=8), T in 1024 4096 8192
    python -m benchmarks.loss_math --lengths 1024 --repeats 5 --no-compile
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks import reporting

NUM_GENERATIONS = 8
NUM_ROWS = 16
STEP_EVERY = 64


def make_inputs(length: int, seed: int = 0) -> dict:
    """Random per-token log-probs of ``NUM_ROWS`` ragged completions (float32), rewards, step boundaries."""
    import torch

    generator = torch.Generator().manual_seed(seed + length)
    lengths = torch.randint(length // 2, length + 1, (NUM_ROWS,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    old_logp = -torch.rand(NUM_ROWS, length, generator=generator) * 3
    logp = old_logp + 0.05 * torch.randn(NUM_ROWS, length, generator=generator)
    boundaries = torch.zeros(NUM_ROWS, length, dtype=torch.bool)
    boundaries[:, STEP_EVERY - 1 :: STEP_EVERY] = True
    return dict(
        logp=logp,
        old_logp=old_logp,
        ref_logp=old_logp - 0.02 * torch.rand(NUM_ROWS, length, generator=generator),
        token_kl=0.01 * torch.rand(NUM_ROWS, length, generator=generator),
        mask=mask,
        rewards=torch.randint(0, 2, (NUM_ROWS,), generator=generator).float(),
        boundaries=boundaries,
    )


def loss_functions() -> dict:
    """Name -> ``f(logp, inputs) -> scalar loss``, each as the trainers compute it (without the model)."""
    import torch

    from gnivo_trl import losses

    def gnivo(unit):
        def loss(logp, x):
            # None: token units; all-False: sequence units (the last valid token always ends a unit).
            boundaries = {"token": None, "step": x["boundaries"], "sequence": torch.zeros_like(x["boundaries"])}[unit]
            return losses.gnivo_loss(logp, x["old_logp"], x["mask"], x["rewards"], NUM_GENERATIONS, 0.2, boundaries)

        return loss

    def vimpo(logp, x):
        advantages = losses.vimpo_advantages(logp, x["ref_logp"], x["token_kl"], x["mask"], 5e-4, 1.0)
        mean, std = losses.masked_mean_std(advantages, x["mask"])
        advantages = losses.whiten(advantages, x["mask"], mean, std)
        value = losses.vimpo_value_loss(
            logp, x["ref_logp"], x["token_kl"], x["mask"], x["rewards"], NUM_GENERATIONS, 5e-4
        )
        actor = losses.dual_clip_ppo_loss(logp, x["old_logp"], advantages, 0.2, 0.28, 10.0)
        return value + 5e-3 * (actor * x["mask"]).sum() / x["mask"].sum()

    return {
        "gnivo/token": gnivo("token"),
        "gnivo/step": gnivo("step"),
        "gnivo/sequence": gnivo("sequence"),
        "vimpo (advantages, whitening, value + actor)": vimpo,
    }


def time_loss(function, inputs: dict, repeats: int) -> tuple[float, object, object]:
    """Median milliseconds of forward + backward; returns also the loss and the gradient of the last call."""
    times = []
    for _ in range(repeats + 1):  # the first call warms up (and compiles)
        logp = inputs["logp"].clone().requires_grad_(True)
        start = time.perf_counter()
        loss = function(logp, inputs)
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3, loss.detach(), logp.grad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="time the plain version only")
    parser.add_argument("--output", type=Path, default=reporting.RESULTS / "overhead" / "loss_math.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    functions = loss_functions()
    rows = []
    for length in args.lengths:
        inputs = make_inputs(length)
        for name, function in functions.items():
            plain_ms, plain_loss, plain_grad = time_loss(function, inputs, args.repeats)
            cell = [name, f"{length}", f"{plain_ms:.2f}"]
            if not args.no_compile:
                torch._dynamo.reset()
                compiled_ms, compiled_loss, compiled_grad = time_loss(torch.compile(function), inputs, args.repeats)
                difference = max(
                    (compiled_loss - plain_loss).abs().item(), (compiled_grad - plain_grad).abs().max().item()
                )
                if difference > 1e-5:
                    raise RuntimeError(f"{name} T={length}: compiled differs from plain by {difference:.2e}")
                cell += [f"{compiled_ms:.2f}", f"{compiled_ms / plain_ms:.2f}", f"{difference:.1e}"]
            rows.append(cell)
            print(" | ".join(cell), flush=True)
    header = ["loss", "T", "plain ms"] + ([] if args.no_compile else ["compiled ms", "compiled / plain", "max diff"])
    command = "python -m benchmarks.loss_math " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Loss math alone: milliseconds per forward + backward, plain and compiled (CPU)",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}",
        "",
        f"Inputs: B={NUM_ROWS} rows (groups of K={NUM_GENERATIONS}), ragged lengths in [T/2, T], float32 random "
        f"log-probs, a step boundary every {STEP_EVERY} tokens; median over {args.repeats} calls after a warm-up "
        "(which compiles). The compiled loss and gradient must equal the plain ones to 1e-5.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell) + " |" for cell in rows),
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    reporting.write_report(args.output, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
