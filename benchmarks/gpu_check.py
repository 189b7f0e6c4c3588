"""One-command GPU check: overhead, anchor, end-to-end training, numerics and DeepSpeed, in one Markdown report.

Meant for any machine with one CUDA GPU (``bash benchmarks/gpu_check.sh``, under 8 minutes on one H200); ``--device
cpu --smoke`` runs every part at a tiny shape on CPU (the smoke test in ``tests/test_gpu_check.py``). Parts:

1. **overhead**: step time (seconds) and peak allocated memory (MiB above the resident models) of GRPO (beta 0 and
   0.04), GN-IVO (token and step units) and VIMPO (exact KL and k3) on a randomly initialised Qwen2-0.5B-shaped model
   (V = 151,936, bf16 weights, gradient checkpointing), B = 2 and 8 completions (one group), T = 1024, 4096 and 8192
   completion tokens after a 128-token prompt, as ratios to GRPO / GRPO with a reference model. The measurement is
   ``benchmarks/overhead.py``'s (``build_trainer``, ``one_step``: scoring + loss step, fixed completions, methods
   interleaved, median of per-repetition ratios); the aligned scenario only (TRL's default layout).
2. **anchor**: the same figures at B = 2, T = 4096 against the H100 anchor measurement (``benchmarks/README.md``, "The
   H100 anchor": GRPO with a reference model 0.188 s, 14.19 GiB).
3. **end-to-end**: ``trainer.train()`` for 20 steps of GRPO, GN-IVO and VIMPO with transformers generation (real
   ``generate``) on a small model saved in float32 and trained under bf16 autocast: every logged loss and metric finite,
   every parameter finite; VIMPO's rho and KL exactly 0 at step 1 (the policy is the reference), in that run and in
   one step with bf16 weights (``bf16=True``, one process).
4. **numerics**: VIMPO's per-token scores (``VIMPOTrainer._token_scores``) against TRL's fused head
   (``GRPOTrainer._get_per_token_logps_and_entropies``) and against a float32 full-vocabulary computation, with bf16
   weights and with float32 weights under bf16 autocast; plus one loss step per trainer under autocast with float32
   weights (finite loss and gradients, weights still float32).
5. **deepspeed**: one optimizer step of GN-IVO and VIMPO (full fine-tuning) under ZeRO-2 and under ZeRO-3, each stage
   in its own single-process ``accelerate launch`` of the shipped config (one GPU cannot host two ranks), if DeepSpeed
   imports; VIMPO's rho and KL exactly 0 at step 1 (under DeepSpeed the reference is placed when the trainer is
   built, the policy in ``train()``).

Each part catches its own failure and records it; the whole run keeps to ``--budget-s`` (sizes that would not fit
are skipped and listed). An out-of-memory error at a size is recorded as OOM for that cell.

Usage::

    bash benchmarks/gpu_check.sh              # CUDA, writes benchmarks/results/gpu_check/gpu_<device-name>.md
    python -m benchmarks.gpu_check --output /tmp/gpu.md  # the same, another path (from the repository root)
    python -m benchmarks.gpu_check --device cpu --smoke --output /tmp/smoke.md  # tiny CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import overhead, reporting  # overhead: model, trainers, one_step, PeakMemory

STUDY = "gpu_check"
REPO_ROOT = reporting.REPO_ROOT

# The smoke run's shape: overhead.py's "tiny" (V = 32,000) makes the CPU smoke test several times slower for no added
# coverage. Registered here, not in overhead.py, which does not offer it on its command line.
overhead.MODEL_SHAPES.setdefault(
    "smoke",
    dict(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
)

METHODS = ["grpo", "grpo+ref", "gnivo/token", "gnivo/step", "vimpo/exact", "vimpo/k3"]
ANCHOR = {  # benchmarks/README.md, "The H100 anchor": H100 80GB, Qwen2-0.5B shape, bf16, B=2 after a 128-token prompt
    "device": "NVIDIA H100 80GB",
    "batch": 2,
    "length": 4096,
    "grpo": (0.128, 14.19),  # (step seconds, peak GiB above the resident model)
    "grpo+ref": (0.188, 14.19),
}
TARGETS = {  # ratio ceilings (time, memory) and their baseline
    "gnivo/token": ("grpo", 1.02, 1.01),
    "gnivo/step": ("grpo", 1.02, 1.01),
    "vimpo/exact": ("grpo+ref", 1.10, 1.10),
}
# Tolerances of the numerics checks, in nats. Same weights and precision (VIMPO's scores vs TRL's fused head): only
# accumulation order and bf16 rounding of logits (about 2**-9 relative) differ. Against float32 (bf16 weights or bf16
# autocast vs a float32 forward of the same weights) the backbone's bf16 rounding adds up over the layers.
TOLERANCE_SAME_PRECISION = 0.05
TOLERANCE_VS_FLOAT32 = 0.25
TOLERANCE_KL_VS_FLOAT32 = (1e-3, 0.1)  # (nats, fraction of the largest float32 KL): the KL is small, so relative too
POLICY_PERTURBATION = 1.25  # the policy's final-norm scale, so that the policy differs from the reference (KL > 0)


@dataclass
class Settings:
    """Sizes of one run: the full CUDA check or the tiny smoke run (``--smoke``)."""

    device: str
    shape: str  # a key of overhead.MODEL_SHAPES
    batches: tuple[int, ...]
    lengths: tuple[int, ...]
    repeats: int
    anchor_length: int
    e2e_steps: int
    e2e_completion_length: int
    numerics_length: int
    deepspeed_timeout_s: int
    smoke: bool = False

    @property
    def model_dtype(self) -> str:
        """Weights of the overhead part: bf16 on CUDA, as in the anchor (TRL would load float32 otherwise)."""
        return "bfloat16" if self.device == "cuda" else "float32"

    @classmethod
    def for_run(cls, device: str, smoke: bool) -> Settings:
        if smoke:
            return cls(device, "smoke", (2, 4), (16, 32), 1, 32, 2, 8, 16, 180, smoke=True)
        shape = "qwen2-0.5b" if device == "cuda" else "tiny"
        return cls(device, shape, (2, 8), (1024, 4096, 8192), 3, 4096, 20, 64, 1024, 180)


@dataclass
class Part:
    """One part's outcome: ``status`` is ok, failed or skipped; ``lines`` its Markdown section body."""

    name: str
    title: str
    status: str = "ok"
    seconds: float = 0.0
    note: str = ""
    lines: list[str] = field(default_factory=list)
    error: str = ""


class Budget:
    """Wall-clock budget in seconds, counted from ``start`` (the shell script's start when it exports it)."""

    def __init__(self, total_s: float, start: float | None = None):
        self.total_s = total_s
        self.start = start if start is not None else time.time()

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def slug(text: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``: the report's default file name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def release_memory(device: str) -> None:
    """Return freed blocks to the device after a trainer or an OOM (the caching allocator keeps them otherwise)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def short_error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:200]


def library_versions() -> dict[str, str]:
    """Versions of the libraries the check runs on (``not installed`` where one does not import)."""
    import importlib

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "gnivo_trl"):
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # DeepSpeed can fail at import for reasons other than absence (no CUDA toolkit)
            versions[name] = f"not available ({short_error(exc)})"
    import torch

    versions["CUDA (torch build)"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        versions["compute capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(smi, capture_output=True, text=True, timeout=20)
            if driver.returncode == 0:
                versions["driver"] = driver.stdout.strip().splitlines()[0]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
            versions["gnivo-trl commit"] = commit.stdout.strip() + (" (uncommitted changes)" if dirty.stdout else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return versions


def _stub_generation(trainer, completions: list[list[int]]) -> None:
    """Generation returns these fixed completions, as in ``overhead.build_trainer`` (there for its own length).

    Lets one trainer per method and B serve every T: the trainers are built for the largest T, whose
    ``max_completion_length`` only bounds generation, which this stub replaces.
    """

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [list(completions[i % len(completions)]) for i in range(len(prompt_ids))], None

    trainer._generate_single_turn = generate


def _fmt_ratio(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


# ----------------------------------------------------------------------------------------------------------------------
# Part 1 and 2: overhead and the anchor
# ----------------------------------------------------------------------------------------------------------------------


def measure_overhead(settings: Settings, model_dir: str, workdir: Path, deadline: float) -> dict:
    """Step figures per (B, T, method): a list of ``overhead.one_step`` dicts, or a string (``OOM``, error, skip).

    ``deadline`` (``time.time()`` seconds) is when the part must end: a size whose estimated cost (the previous size's
    time scaled by its token count, with a margin for attention's quadratic term) would pass it is skipped.
    """
    vocab = overhead.model_shape(settings.device, settings.shape)["vocab_size"]
    results: dict[tuple[int, int, str], list[dict] | str] = {}
    last_cost: tuple[int, float] | None = None  # (tokens, seconds) of the last measured size

    def skip_reason(tokens: int) -> str | None:
        """Why a size of ``tokens`` completion tokens does not fit in the budget any more, or None if it does."""
        left = deadline - time.time()
        if left <= 0:
            return "skipped (time budget spent)"
        estimate = 1.5 * last_cost[1] * tokens / last_cost[0] if last_cost else 0.0
        return f"skipped (time budget: about {estimate:.0f} s needed, {left:.0f} s left)" if estimate > left else None

    for batch in settings.batches:
        trainers: dict[str, tuple] = {}
        reason = skip_reason(batch * min(settings.lengths))  # not even this B's cheapest size fits: build nothing
        if reason:
            results.update({(batch, length, method): reason for length in settings.lengths for method in METHODS})
            continue
        try:
            for method in METHODS:
                trainers[method] = overhead.build_trainer(
                    method,
                    model_dir,
                    settings.device,
                    max(settings.lengths),
                    str(workdir / "out"),
                    shape_name=settings.shape,
                    num_completions=batch,
                    model_dtype=settings.model_dtype,
                )
            # overhead.PeakMemory runs gc.collect() twice a step; over the heap of six trainers and their libraries
            # that takes about 0.3 s each time. Frozen objects are not scanned (only the step's new ones), and the
            # heap is unfrozen before the trainers are released, so their reference cycles are still collected.
            gc.collect()
            gc.freeze()
            for length in settings.lengths:
                tokens = batch * length
                reason = skip_reason(tokens)
                if reason:
                    results.update({(batch, length, method): reason for method in METHODS})
                    continue
                started = time.time()
                completions = overhead.fixed_completions(length, vocab, num_completions=batch)
                live = []
                for method in METHODS:
                    earlier_oom = any(
                        results.get((batch, shorter, method)) == "OOM"
                        for shorter in settings.lengths
                        if shorter < length
                    )
                    if earlier_oom:
                        results[(batch, length, method)] = "OOM (at a shorter T)"
                        continue
                    trainer, rows = trainers[method]
                    _stub_generation(trainer, completions)
                    outcome = _step_or_reason(trainer, rows, settings.device)  # warm-up: kernels, allocator
                    if isinstance(outcome, str):
                        results[(batch, length, method)] = outcome
                    else:
                        live.append(method)
                for repeat in range(settings.repeats):
                    order = live if repeat % 2 == 0 else list(reversed(live))  # interleaved, alternating order
                    for method in order:
                        if isinstance(results.get((batch, length, method)), str):
                            continue  # failed in an earlier repetition
                        outcome = _step_or_reason(*trainers[method], settings.device)
                        if isinstance(outcome, str):
                            results[(batch, length, method)] = outcome
                        else:
                            results.setdefault((batch, length, method), []).append(outcome)
                last_cost = (tokens, time.time() - started)
                for method in METHODS:
                    figures = results[(batch, length, method)]
                    text = (
                        figures
                        if isinstance(figures, str)
                        else f"step {statistics.median(f['step_s'] for f in figures):.4f} s, "
                        f"peak {statistics.median(f['peak_mib'] for f in figures):.0f} MiB"
                    )
                    print(f"[overhead] B={batch} T={length:5d} {method:12s} {text}", flush=True)
        finally:
            gc.unfreeze()
            trainers.clear()
            release_memory(settings.device)
    return results


def _step_or_reason(trainer, rows: list[dict], device: str) -> dict | str:
    """``overhead.one_step``'s figures, or ``OOM`` / the error's first line (the memory is released either way)."""
    try:
        return overhead.one_step(trainer, rows, device)
    except Exception as exc:
        reason = "OOM" if is_out_of_memory(exc) else f"error: {short_error(exc)}"
    trainer.model.zero_grad(set_to_none=True)
    release_memory(device)
    return reason


def _median(figures, key: str) -> float:
    return statistics.median(f[key] for f in figures)


def _ratio(results: dict, batch: int, length: int, method: str, baseline: str, key: str) -> float:
    """Median over repetitions of the per-repetition ratio to ``baseline`` (NaN where either did not run)."""
    mine, base = results.get((batch, length, method)), results.get((batch, length, baseline))
    if not isinstance(mine, list) or not isinstance(base, list) or len(mine) != len(base):
        return float("nan")
    return overhead.median_ratio({(length, method): mine, (length, baseline): base}, length, method, baseline, key)


def overhead_section(settings: Settings, results: dict) -> list[str]:
    lines = [
        f"Model: Qwen2 architecture, shape `{settings.shape}` "
        f"({', '.join(f'{k} {v:,}' for k, v in overhead.model_shape(settings.device, settings.shape).items())}), "
        f"random initialisation, weights loaded in {settings.model_dtype} (`model_init_kwargs`; TRL's default would be "
        "float32), gradient checkpointing. B completions (one "
        f"group) of exactly T tokens after a {overhead.PROMPT_LENGTH}-token prompt, the same fixed tokens for every "
        "method (generation stubbed out), aligned scenario (one optimizer step per generation batch, no old "
        "log-probs). One step = scoring (`_generate_and_score_completions`) + loss step (`compute_loss`, backward), "
        "from `benchmarks/overhead.py` (`one_step`). Each ratio is the median over "
        f"{settings.repeats} repetition(s) of the ratio measured in the same repetition (methods interleaved, one "
        "warm-up step each). Memory: `torch.cuda.max_memory_allocated` above the allocation before the step "
        "(on CPU: growth of the process's peak resident set).",
    ]

    def cell(batch: int, length: int, method: str, render: Callable[[list[dict]], str]) -> str:
        figures = results.get((batch, length, method), "not run")
        return figures if isinstance(figures, str) else render(figures)

    for batch in settings.batches:
        header = "| method | " + " | ".join(f"T={t}" for t in settings.lengths) + " |"
        rule = "|---|" + "---|" * len(settings.lengths)
        for title, key in (
            ("Step time, ratio to GRPO / to GRPO with a reference model", "step_s"),
            ("Peak memory, ratio to GRPO / to GRPO with a reference model", "peak_mib"),
        ):
            lines += ["", f"### B={batch}: {title}", "", header, rule]
            for method in METHODS:
                row = [
                    cell(
                        batch,
                        length,
                        method,
                        lambda f, batch=batch, length=length, method=method, key=key: " / ".join(
                            _fmt_ratio(_ratio(results, batch, length, method, base, key))
                            for base in ("grpo", "grpo+ref")
                        ),
                    )
                    for length in settings.lengths
                ]
                lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines += [
            "",
            f"### B={batch}: absolute medians, step seconds (scoring + loss step), peak MiB",
            "",
            header,
            rule,
        ]
        for method in METHODS:
            row = [
                cell(
                    batch,
                    length,
                    method,
                    lambda f: (
                        f"{_median(f, 'step_s'):.4f} s ({_median(f, 'score_s'):.4f} + "
                        f"{_median(f, 'loss_s'):.4f}), {_median(f, 'peak_mib'):,.0f} MiB"
                    ),
                )
                for length in settings.lengths
            ]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def anchor_section(settings: Settings, results: dict) -> tuple[list[str], dict[str, str]]:
    """Our GRPO, GRPO+ref and VIMPO exact at the anchor's size against the H100 anchor; returns lines and verdicts."""
    batch, length = ANCHOR["batch"], settings.anchor_length
    lines = [
        f"Anchor ({ANCHOR['device']}, `benchmarks/README.md`, 'The H100 anchor'): B={batch}, T={ANCHOR['length']}, "
        f"GRPO 0.128 s / 14.19 GiB, GRPO with a reference model 0.188 s / 14.19 GiB; VIMPO's target is 1.10x GRPO+ref "
        "(about 0.207 s / 15.61 GiB). Ours at B=2, "
        f"T={length} on this device. The anchor is another GPU (an H200 has an H100's arithmetic and 1.4x its memory "
        "bandwidth), so the time ratios are indicative; memory is device-independent up to allocator details.",
        "",
        "| method | step s | peak GiB | time / anchor GRPO+ref | memory / anchor GRPO+ref |",
        "|---|---|---|---|---|",
    ]
    verdicts = {}
    anchor_time, anchor_gib = ANCHOR["grpo+ref"]
    for method in ("grpo", "grpo+ref", "vimpo/exact", "vimpo/k3"):
        figures = results.get((batch, length, method), "not run")
        if isinstance(figures, str):
            lines.append(f"| {method} | {figures} | | | |")
            continue
        step, gib = _median(figures, "step_s"), _median(figures, "peak_mib") / 1024
        lines.append(f"| {method} | {step:.4f} | {gib:.2f} | {step / anchor_time:.3f} | {gib / anchor_gib:.3f} |")
        if method == "vimpo/exact":
            met = step <= 1.10 * anchor_time and gib <= 1.10 * anchor_gib
            verdicts["vimpo/exact"] = f"{step:.3f} s, {gib:.2f} GiB: {'met' if met else 'missed'}"
    if settings.device != "cuda" or length != ANCHOR["length"]:
        lines += ["", "(Not the anchor's configuration: smoke or CPU run, the comparison only exercises the code.)"]
    return lines, verdicts


def target_rows(settings: Settings, results: dict, anchor_verdicts: dict[str, str]) -> list[str]:
    """The targets table: every measured cell against its ceiling; met only if all measured cells meet it."""
    rows = ["| target | measured (B, T: time, memory) | verdict |", "|---|---|---|"]
    for method, (baseline, max_time, max_memory) in TARGETS.items():
        cells, verdict = [], "met"
        for batch in settings.batches:
            for length in settings.lengths:
                time_ratio = _ratio(results, batch, length, method, baseline, "step_s")
                memory_ratio = _ratio(results, batch, length, method, baseline, "peak_mib")
                if not (math.isfinite(time_ratio) and math.isfinite(memory_ratio)):
                    continue
                cells.append(f"B={batch} T={length}: {time_ratio:.3f}, {memory_ratio:.3f}")
                if time_ratio > max_time or memory_ratio > max_memory:
                    verdict = "missed"
        if not cells:
            verdict = "not measured"
        name = "GRPO" if baseline == "grpo" else "GRPO with a reference model"
        rows.append(
            f"| {method}: time <= {max_time:.2f}x and memory <= {max_memory:.2f}x {name} | {'; '.join(cells)} | "
            f"**{verdict}** |"
        )
    batch, length = min(settings.batches), max(settings.lengths)
    for method in ("vimpo/exact", "vimpo/k3"):
        outcome = results.get((batch, length, method), "not run")
        ran = isinstance(outcome, list)
        verdict = "met" if ran else "not measured" if outcome.startswith(("skipped", "not run")) else "missed"
        rows.append(f"| {method} runs at T={length}, B={batch} | {'ran' if ran else outcome} | **{verdict}** |")
    if "vimpo/exact" in anchor_verdicts:
        rows.append(
            f"| vimpo/exact within 1.10x of the anchor's GRPO+ref (0.207 s, 15.61 GiB; H100) | "
            f"{anchor_verdicts['vimpo/exact']} | indicative |"
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Part 3: end-to-end training with real generation
# ----------------------------------------------------------------------------------------------------------------------


def _distinct_characters_reward(completions, **kwargs) -> list[float]:
    """A dense reward that differs between random completions: distinct characters / 20, at most 1."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [min(len(set(text)) / 20, 1.0) for text in texts]


def _small_model(directory: Path, device: str) -> str:
    """A small Qwen2 model saved in float32 (trained under bf16 autocast on CUDA) with the in-process BPE tokenizer."""
    from gnivo_trl.testing import save_tiny_model

    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4) if device == "cuda" else {}
    return save_tiny_model(directory, **size)


def _train_config(method: str, output_dir: str, device: str, **overrides):
    from trl import GRPOConfig

    from gnivo_trl import GNIVOConfig, VIMPOConfig

    config_cls = {"grpo": GRPOConfig, "gnivo": GNIVOConfig, "vimpo": VIMPOConfig}[method]
    common = dict(
        output_dir=output_dir,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        per_device_train_batch_size=8,
        num_generations=4,
        learning_rate=1e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    common.update(overrides)
    return config_cls(**common)


def _trainer_class(method: str):
    from trl import GRPOTrainer

    from gnivo_trl import GNIVOTrainer, VIMPOTrainer

    return {"grpo": GRPOTrainer, "gnivo": GNIVOTrainer, "vimpo": VIMPOTrainer}[method]


def _record_step_one_scores(trainer) -> dict[str, float]:
    """VIMPO's largest ``|log pi - log pi_ref|`` and ``|KL|`` over the valid tokens of the first micro-batch it scores
    (``VIMPOTrainer._token_scores``), filled in when training runs: at step 1 the policy is still the reference, so
    both must be exactly 0 (the policy's forward runs with gradient, the reference's without)."""
    record: dict[str, float] = {}
    token_scores = trainer._token_scores

    def recording(model, inputs):
        scores = token_scores(model, inputs)
        if not record:
            valid = inputs["completion_mask"].bool()
            record["log_ratio"] = float((scores.logp.detach() - scores.ref_logp)[valid].abs().max())
            record["kl"] = float(scores.token_kl[valid].abs().max())
        return scores

    trainer._token_scores = recording
    return record


def _exact_zeros_row(label: str, record: dict[str, float], logged: dict) -> tuple[str, bool]:
    """A row of the exact-zeros table and whether rho and the KL were exactly 0 at step 1."""
    ok = record.get("log_ratio") == 0.0 and record.get("kl") == 0.0
    figures = " | ".join(f"{record[key]:.3g}" if key in record else "not scored" for key in ("log_ratio", "kl"))
    metrics = ", ".join(f"{name} {logged.get(name, float('nan')):.3g}" for name in ("vimpo/kl", "vimpo/advantage_std"))
    return f"| {label} | {figures} | {metrics} | **{'exact 0' if ok else 'FAILED'}** |", ok


def exact_zeros_section(runs: list[tuple[str, dict[str, float], dict]]) -> tuple[list[str], list[str]]:
    """The exact-zeros table of ``(label, step-one record, step-1 log entry)`` runs; returns its lines and failures."""
    lines = [
        "",
        "### Exact zeros at step 1 (policy = reference)",
        "",
        "VIMPO's rho and KL while the policy still equals the reference: the largest |log pi - log pi_ref| and |KL| "
        "(nats) over the valid tokens of the first micro-batch, and the metrics a user reads at step 1. Exactly 0 "
        "is expected: both models run TRL's fused forward on the same weights (the policy with gradient, the "
        "reference without).",
        "",
        "| run | max abs log-ratio | max abs KL | logged at step 1 | verdict |",
        "|---|---|---|---|---|",
    ]
    failures = []
    for label, record, logged in runs:
        row, ok = _exact_zeros_row(label, record, logged)
        lines.append(row)
        if not ok:
            failures.append(f"{label}: rho or the KL not exactly 0 at step 1 ({record})")
    return lines, failures


def end_to_end(settings: Settings, workdir: Path) -> list[str]:
    """``train()`` for ``settings.e2e_steps`` steps of each trainer with transformers generation; raises on NaN."""
    import torch

    from gnivo_trl.testing import tiny_prompt_dataset

    model_dir = _small_model(workdir / "small-model", settings.device)
    lines = [
        f"`trainer.train()` for {settings.e2e_steps} optimizer steps, transformers `generate` (sampling, up to "
        f"{settings.e2e_completion_length} new tokens), 8 completions per step (2 prompts x K=4), learning rate 1e-4, "
        "logging every step; small Qwen2 model (BPE vocabulary of 300) saved in float32, "
        f"{'trained under bf16 autocast' if settings.device == 'cuda' else 'float32'}; reward: distinct characters / "
        "20. Checked: every logged value finite, every parameter finite after training.",
        "",
        "| trainer | steps logged | seconds | first / last loss | mean reward | non-finite logged values | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    failures = []
    zeros: list[tuple[str, dict[str, float], dict]] = []
    for method in ("grpo", "gnivo", "vimpo"):
        args = _train_config(
            method,
            str(workdir / f"e2e-{method}"),
            settings.device,
            max_steps=settings.e2e_steps,
            max_completion_length=settings.e2e_completion_length,
        )
        started = time.time()
        trainer = _trainer_class(method)(
            model=model_dir,
            reward_funcs=_distinct_characters_reward,
            args=args,
            train_dataset=tiny_prompt_dataset(32),
        )
        step_one = _record_step_one_scores(trainer) if method == "vimpo" else None
        trainer.train()
        seconds = time.time() - started
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        bad = sorted(
            {
                key
                for entry in trainer.state.log_history
                for key, value in entry.items()
                if isinstance(value, (int, float)) and not math.isfinite(value)
            }
        )
        parameters_finite = all(torch.isfinite(p).all() for p in trainer.model.parameters())
        ok = len(logged) == settings.e2e_steps and not bad and parameters_finite
        rewards = [entry["reward"] for entry in logged if "reward" in entry]
        losses = f"{logged[0]['loss']:.4g} / {logged[-1]['loss']:.4g}" if logged else "none"
        note = ", ".join(bad) + ("" if parameters_finite else " non-finite parameters")
        lines.append(
            f"| {method} | {len(logged)} | {seconds:.1f} | {losses} | "
            f"{statistics.mean(rewards) if rewards else float('nan'):.3f} | {note or 'none'} | "
            f"**{'ok' if ok else 'FAILED'}** |"
        )
        if not ok:
            failures.append(method)
        if step_one is not None:
            weights = "float32 weights, bf16 autocast" if settings.device == "cuda" else "float32"
            zeros.append((f"VIMPO, one process, {weights} (this part's run)", step_one, logged[0] if logged else {}))
        del trainer
        release_memory(settings.device)
    zeros.append(("VIMPO, one process, bf16 weights, `bf16=True`", *_vimpo_bf16_step(settings, workdir, model_dir)))
    zero_lines, zero_failures = exact_zeros_section(zeros)
    lines += zero_lines
    if failures or zero_failures:
        problems = ([f"non-finite values or missing steps: {', '.join(failures)}"] if failures else []) + zero_failures
        raise _PartFailure(lines, "; ".join(problems))
    return lines


def _vimpo_bf16_step(settings: Settings, workdir: Path, model_dir: str) -> tuple[dict[str, float], dict]:
    """One VIMPO step with bf16 weights and ``bf16=True`` in one process (also on CPU); its step-one record and
    first log entry."""
    from gnivo_trl.testing import tiny_prompt_dataset

    args = _train_config(
        "vimpo",
        str(workdir / "e2e-vimpo-bf16"),
        settings.device,
        max_steps=1,
        max_completion_length=settings.e2e_completion_length,
        bf16=True,
        model_init_kwargs={"dtype": "bfloat16"},
    )
    trainer = _trainer_class("vimpo")(
        model=model_dir, reward_funcs=_distinct_characters_reward, args=args, train_dataset=tiny_prompt_dataset(16)
    )
    step_one = _record_step_one_scores(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    del trainer
    release_memory(settings.device)
    return step_one, logged[0] if logged else {}


class _PartFailure(RuntimeError):
    """A part that ran to the end but whose checks failed: its table is kept in the report."""

    def __init__(self, lines: list[str], message: str):
        super().__init__(message)
        self.lines = lines


# ----------------------------------------------------------------------------------------------------------------------
# Part 4: numerics
# ----------------------------------------------------------------------------------------------------------------------


def _float32_scores(model_dir: str, perturb: bool, input_ids, attention_mask, num_completion: int, device: str):
    """``(logp, logsoftmax)`` of the completion tokens from a float32 forward of ``model_dir``'s weights, no autocast.

    ``logp`` is ``(B, C)``; ``logsoftmax`` ``(B, C, V)`` float32 (the full distribution, for the exact KL).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    if perturb:
        with torch.no_grad():
            model.model.norm.weight.mul_(POLICY_PERTURBATION)
    with torch.no_grad(), torch.autocast(device_type=device, enabled=False):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = model.lm_head(hidden[:, -num_completion - 1 : -1]).float()
        logsoftmax = torch.log_softmax(logits, dim=-1)
        del logits
    completion_ids = input_ids[:, -num_completion:]
    logp = logsoftmax.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    del model
    return logp, logsoftmax


def _max_and_mean(a, b, valid) -> tuple[float, float]:
    difference = (a.float() - b.float()).abs()[valid]
    return difference.max().item(), difference.mean().item()


def vimpo_token_scores_check(
    settings: Settings, model_dir: str, workdir: Path, label: str, dtype: str
) -> tuple[list[str], bool]:
    """VIMPO's ``_token_scores`` against TRL's fused head and a float32 computation; returns table rows and a verdict.

    The VIMPO trainer is ``overhead.build_trainer``'s (bf16 autocast on CUDA, fixed completions of
    ``settings.numerics_length`` tokens, B=2); the policy's final norm is scaled by ``POLICY_PERTURBATION`` so that
    the policy differs from the reference and the KL is not trivially 0. Rows: quantity, max / mean absolute
    difference in nats, tolerance, verdict.
    """
    import torch
    from trl import GRPOTrainer

    trainer, rows = overhead.build_trainer(
        "vimpo/exact",
        model_dir,
        settings.device,
        settings.numerics_length,
        str(workdir / "numerics"),
        shape_name=settings.shape,
        model_dtype=dtype,
    )
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    loaded = {str(p.dtype).removeprefix("torch.") for p in unwrapped.parameters()}
    if loaded != {dtype}:
        raise RuntimeError(f"the policy was loaded in {sorted(loaded)}, not {dtype}")
    with torch.no_grad():
        unwrapped.model.norm.weight.mul_(POLICY_PERTURBATION)  # the reference is a separate copy, left unchanged
    inputs = trainer._generate_and_score_completions(rows)
    with trainer.accelerator.autocast():  # the precision of a training step (accelerate's autocast, if any)
        scores = trainer._token_scores(trainer.model, inputs)
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    num_completion = completion_ids.size(1)
    valid = inputs["completion_mask"].bool()
    with torch.no_grad(), trainer.accelerator.autocast():
        fused_logp, fused_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, input_ids, attention_mask, num_completion, compute_entropy=True
        )
        fused_ref_logp, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.ref_model, input_ids, attention_mask, num_completion
        )
    policy32, policy_logsoftmax = _float32_scores(
        model_dir, True, input_ids, attention_mask, num_completion, settings.device
    )
    ref32, ref_logsoftmax = _float32_scores(
        model_dir, False, input_ids, attention_mask, num_completion, settings.device
    )
    kl32 = (policy_logsoftmax.exp() * (policy_logsoftmax - ref_logsoftmax)).sum(-1)
    entropy32 = -(policy_logsoftmax.exp() * policy_logsoftmax).sum(-1)
    del policy_logsoftmax, ref_logsoftmax
    kl_tolerance = TOLERANCE_KL_VS_FLOAT32[0] + TOLERANCE_KL_VS_FLOAT32[1] * kl32[valid].max().item()
    comparisons = [
        ("logp vs TRL fused head", scores.logp.detach(), fused_logp, TOLERANCE_SAME_PRECISION),
        ("ref_logp vs TRL fused head (reference)", scores.ref_logp, fused_ref_logp, TOLERANCE_SAME_PRECISION),
        ("logp vs float32", scores.logp.detach(), policy32, TOLERANCE_VS_FLOAT32),
        ("ref_logp vs float32", scores.ref_logp, ref32, TOLERANCE_VS_FLOAT32),
        ("token_kl (exact) vs float32", scores.token_kl, kl32, kl_tolerance),
    ]
    if scores.entropy is not None:
        comparisons.insert(1, ("entropy vs TRL fused head", scores.entropy, fused_entropy, TOLERANCE_SAME_PRECISION))
        comparisons.append(("entropy vs float32", scores.entropy, entropy32, TOLERANCE_VS_FLOAT32))
    table, all_ok = [], True
    for name, ours, theirs, tolerance in comparisons:
        worst, mean = _max_and_mean(ours, theirs, valid)
        ok = math.isfinite(worst) and worst <= tolerance
        all_ok &= ok
        table.append(
            f"| {label} | {name} | {worst:.2e} | {mean:.2e} | {tolerance:.3g} | **{'ok' if ok else 'FAILED'}** |"
        )
    kl_mean = kl32[valid].mean().item()
    finite = all(torch.isfinite(t[valid]).all() for t in (scores.logp, scores.ref_logp, scores.token_kl))
    all_ok &= bool(finite) and scores.logp.dtype == torch.float32 and scores.token_kl.dtype == torch.float32
    table.append(
        f"| {label} | dtypes (logp, token_kl) {scores.logp.dtype}, {scores.token_kl.dtype}; all finite: {finite}; "
        f"float32 mean KL {kl_mean:.3e} nats | | | float32, finite | **{'ok' if all_ok else 'FAILED'}** |"
    )
    del trainer, inputs, scores
    release_memory(settings.device)
    return table, all_ok


def autocast_loss_steps(settings: Settings, model_dir: str, workdir: Path) -> tuple[list[str], bool]:
    """One loss step of GRPO+ref, GN-IVO and VIMPO with float32 weights under the trainer's bf16 autocast.

    Public behaviour only (``_generate_and_score_completions``, ``compute_loss``, backward, inside
    ``accelerator.autocast()`` as in a training step). Checked: finite loss, finite gradients, weights and gradients
    still float32.
    """
    import torch

    table, all_ok = [], True
    for method in ("grpo+ref", "gnivo/token", "vimpo/exact"):
        trainer, rows = overhead.build_trainer(
            method,
            model_dir,
            settings.device,
            settings.numerics_length,
            str(workdir / "numerics"),
            shape_name=settings.shape,
            model_dtype="float32",
        )
        trainer.model.zero_grad(set_to_none=True)
        batch = trainer._generate_and_score_completions(rows)
        with trainer.accelerator.autocast():
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        parameters = [p for p in trainer.model.parameters() if p.requires_grad]
        grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in parameters)
        dtypes = sorted(
            {str(p.dtype) for p in parameters} | {str(p.grad.dtype) for p in parameters if p.grad is not None}
        )
        ok = bool(torch.isfinite(loss)) and grads_finite and dtypes == ["torch.float32"]
        all_ok &= ok
        table.append(
            f"| float32 weights, autocast | {method} loss step: loss {loss.item():.4g}, gradients finite "
            f"{grads_finite}, dtypes {', '.join(dtypes)} | | | finite, float32 | **{'ok' if ok else 'FAILED'}** |"
        )
        del trainer, batch, loss, parameters
        release_memory(settings.device)
    return table, all_ok


def numerics(settings: Settings, workdir: Path, model_dir: str) -> tuple[list[str], str]:
    """Part 4 on ``model_dir`` (the overhead part's bf16 checkpoint); returns its lines and status (ok or failed).

    The float32 checks load the same checkpoint in float32: weights whose values are bf16-exact, which changes
    nothing in how autocast treats them, and spares a second random initialisation of the model.
    """
    autocast = settings.device == "cuda"
    lines = [
        f"Qwen2 shape `{settings.shape}` ({overhead.model_shape(settings.device, settings.shape)['vocab_size']:,}-token "
        f"vocabulary), B=2 fixed completions of T={settings.numerics_length} tokens after a "
        f"{overhead.PROMPT_LENGTH}-token prompt; VIMPO with the exact KL; the policy's final norm scaled by "
        f"{POLICY_PERTURBATION} so that policy and reference differ. Two weight precisions: bf16 weights, and float32 "
        f"weights {'under the trainers bf16 autocast' if autocast else '(no autocast on CPU)'}. "
        "`_token_scores` is VIMPO's scoring (`VIMPOTrainer._token_scores(model, inputs)`); TRL's fused head is "
        "`GRPOTrainer._get_per_token_logps_and_entropies`; float32 is a plain float32 forward of the same weights "
        "with the full-vocabulary log-softmax. Differences in nats over the valid completion tokens.",
        "",
        "| weights | quantity | max abs difference | mean abs difference | tolerance | verdict |",
        "|---|---|---|---|---|---|",
    ]
    status, problems = "ok", []
    checks = (("bf16", model_dir, "bfloat16"), ("float32, autocast" if autocast else "float32", model_dir, "float32"))
    for label, directory, dtype in checks:
        try:
            table, ok = vimpo_token_scores_check(settings, directory, workdir, label, dtype)
            lines += table
            if not ok:
                status, problems = "failed", [*problems, f"{label}: a tolerance is exceeded"]
        except Exception as exc:
            lines.append(f"| {label} | VIMPO `_token_scores` | | | | **FAILED**: {short_error(exc)} |")
            status, problems = "failed", [*problems, f"{label}: {short_error(exc)}", traceback.format_exc(limit=-6)]
        release_memory(settings.device)
    try:
        table, ok = autocast_loss_steps(settings, model_dir, workdir)
        lines += table
        if not ok:
            status, problems = "failed", [*problems, "autocast loss step not finite or not float32"]
    except Exception as exc:
        lines.append(f"| float32 weights | loss steps | | | | **FAILED**: {short_error(exc)} |")
        status, problems = "failed", [*problems, f"loss steps: {short_error(exc)}", traceback.format_exc(limit=-6)]
    if status == "failed":
        raise _PartFailure(lines, "\n".join(problems))
    return lines, status


# ----------------------------------------------------------------------------------------------------------------------
# Part 5: DeepSpeed ZeRO-2 / ZeRO-3, one process each
# ----------------------------------------------------------------------------------------------------------------------


def _accelerate_config(stage: int, device: str, directory: Path) -> Path:
    """The shipped ``examples/accelerate_configs/zero{stage}.yaml`` for one process (and CPU for the smoke run)."""
    import yaml

    config = yaml.safe_load((REPO_ROOT / "examples" / "accelerate_configs" / f"zero{stage}.yaml").read_text())
    config.update(num_processes=1)
    if device == "cpu":
        config.update(use_cpu=True, mixed_precision="no")
    path = directory / f"zero{stage}-1proc.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_commands(settings: Settings, workdir: Path, model_dir: str) -> dict[int, list[str]]:
    return {
        stage: [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(_accelerate_config(stage, settings.device, workdir)),
            "--main_process_port",
            str(_free_port()),
            str(Path(__file__).resolve()),
            "--deepspeed-child",
            str(workdir / f"zero{stage}.json"),
            "--model-dir",
            model_dir,
            "--device",
            settings.device,
        ]
        for stage in (2, 3)
    }


def deepspeed_part(settings: Settings, workdir: Path, timeout_s: float) -> list[str]:
    """Both stages in parallel child processes (one GPU is enough for two single-process jobs of a tiny model)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:
        raise _Skipped(f"DeepSpeed does not import here ({short_error(exc)})") from None
    model_dir = _small_model(workdir / "ds-model", settings.device)
    commands = deepspeed_commands(settings, workdir, model_dir)
    env = dict(os.environ)
    if settings.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # see main(): one thread on a shared CPU
    # The child runs this file as a script: the repository root must be importable for `benchmarks`.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    processes = {
        stage: subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=open(workdir / f"zero{stage}.log", "w"),  # noqa: SIM115  (closed when the child exits)
            stderr=subprocess.STDOUT,
        )
        for stage, command in commands.items()
    }
    lines = [
        "One optimizer step (`trainer.train()`, `max_steps=1`, transformers generation) of GN-IVO and VIMPO on a small "
        "model, each ZeRO stage in its own single-process `accelerate launch` with the shipped "
        "`examples/accelerate_configs/zero{2,3}.yaml` (`num_processes: 1`"
        + (", `use_cpu: true`, `DS_ACCELERATOR=cpu`" if settings.device == "cpu" else "")
        + "). One GPU cannot host two ranks, so this checks that the trainers run under a DeepSpeed engine (ZeRO-3 "
        "sharded parameters, the VIMPO reference prepared by DeepSpeed), not cross-process sharding.",
        "",
        "| stage | trainer | engine | reference | loss | parameters changed | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    zeros: list[tuple[str, dict[str, float], dict]] = []
    failures = []
    deadline = time.time() + timeout_s
    for stage, process in processes.items():
        try:
            process.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        out = workdir / f"zero{stage}.json"
        log_tail = (workdir / f"zero{stage}.log").read_text()[-3000:]
        if process.returncode != 0 or not out.exists():
            reason = "timed out" if process.returncode in (-9, None) else f"exit code {process.returncode}"
            lines.append(f"| ZeRO-{stage} | | | | | | **FAILED** ({reason}) |")
            failures.append(f"ZeRO-{stage} {reason}; last output:\n{log_tail}")
            continue
        for name, run in json.loads(out.read_text()).items():
            ok = run["stage"] == stage and math.isfinite(run["loss"]) and run["changed"] and run["finite"]
            lines.append(
                f"| ZeRO-{run['stage']} | {name} | {run['engine']} | {run['reference']} | {run['loss']:.4g} | "
                f"{run['changed']} | **{'ok' if ok else 'FAILED'}** |"
            )
            if not ok:
                failures.append(f"ZeRO-{stage} {name}: {run}")
            if run["step_one"] is not None:
                label = f"VIMPO, ZeRO-{stage}, full fine-tuning, shipped `zero{stage}.yaml`, one process"
                zeros.append((label, run["step_one"], run["logged"]))
    zero_lines, zero_failures = exact_zeros_section(zeros)
    lines += zero_lines
    failures += zero_failures
    lines += ["", "Commands:", ""] + [f"    {shlex.join(command)}" for command in commands.values()]
    if failures:
        raise _PartFailure(lines, "\n".join(failures))
    return lines


class _Skipped(RuntimeError):
    """A part that cannot run on this machine, for a stated reason."""


def deepspeed_child(out: Path, model_dir: str, device: str) -> int:
    """Inside ``accelerate launch``: one ``train()`` step of GN-IVO and VIMPO under the configured ZeRO stage."""
    import deepspeed
    import torch

    from gnivo_trl.testing import tiny_prompt_dataset

    def sample_parameters(model) -> list[torch.Tensor]:
        # Gathered under ZeRO-3 (a no-op below it): the full values of the first and last parameters.
        named = [p for p in model.parameters() if p.requires_grad]
        chosen = [named[0], named[-1]]
        with deepspeed.zero.GatheredParameters(chosen):
            return [p.detach().float().clone().cpu() for p in chosen]

    results = {}
    for method in ("gnivo", "vimpo"):
        args = _train_config(
            method, str(out.parent / f"ds-{method}"), device, max_steps=1, max_completion_length=16, learning_rate=1e-2
        )
        trainer = _trainer_class(method)(
            model=model_dir, reward_funcs=_distinct_characters_reward, args=args, train_dataset=tiny_prompt_dataset(16)
        )
        step_one = _record_step_one_scores(trainer) if method == "vimpo" else None
        before = sample_parameters(trainer.model)
        trainer.train()
        after = sample_parameters(trainer.model_wrapped)
        logged = [entry for entry in trainer.state.log_history if "loss" in entry][0]
        loss = logged["loss"]
        results[method] = {
            "step_one": step_one,
            "logged": {name: logged[name] for name in ("vimpo/kl", "vimpo/advantage_std") if name in logged},
            "stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
            "engine": type(trainer.model_wrapped).__name__,
            "reference": type(trainer.ref_model).__name__ if trainer.ref_model is not None else "none",
            "loss": loss,
            "changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
            "finite": all(bool(torch.isfinite(a).all()) for a in after),
        }
        print(f"[deepspeed child] {method}: {results[method]}", flush=True)
    out.write_text(json.dumps(results))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Driver and report
# ----------------------------------------------------------------------------------------------------------------------


def run_part(part: Part, function: Callable[[], list[str] | tuple[list[str], str]], device: str) -> Part:
    """Run one part, keeping its failure (traceback in the report) from reaching the others."""
    started = time.time()
    try:
        outcome = function()
        if isinstance(outcome, tuple):
            part.lines, part.status = outcome
        else:
            part.lines = outcome
    except _Skipped as exc:
        part.status, part.note = "skipped", str(exc)
    except _PartFailure as exc:
        summary = str(exc).split("Traceback (most recent call last)")[0].strip().splitlines()
        part.status, part.lines, part.note = "failed", exc.lines, "; ".join(summary)[:300]
        part.error = str(exc)
    except Exception as exc:
        part.status, part.note = "failed", short_error(exc)
        part.error = traceback.format_exc()
    part.seconds = time.time() - started
    print(f"[gpu_check] part {part.name}: {part.status} in {part.seconds:.1f} s {part.note}", flush=True)
    with contextlib.suppress(Exception):
        release_memory(device)
    return part


def write_report(
    output: Path,
    settings: Settings,
    parts: list[Part],
    targets: list[str],
    versions: dict[str, str],
    command: str,
    budget: Budget,
) -> str:
    import torch

    name = device_name(settings.device)
    memory = (
        f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if settings.device == "cuda" else ""
    )
    kind = "smoke (tiny sizes: the verdicts exercise the code, they say nothing about the targets)"
    lines = [
        f"# GPU check: {name}",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Device: **{name}**{memory}. "
        f"Run: {kind if settings.smoke else 'full'}, {budget.elapsed():.0f} s of a {budget.total_s:.0f} s budget.",
        "",
        "Targets: GN-IVO (token and step units) at most 1.02x GRPO's step time and 1.01x its peak memory; VIMPO with "
        "the exact KL at most 1.10x / 1.10x GRPO with a reference model (beta 0.04); VIMPO runs at T=8192, B=2.",
        "",
        "Commands:",
        "",
        f"    {command}",
        "",
        "The carried-wheels route (a CUDA machine with torch, transformers and accelerate but no network; `.whl/` made "
        "by `shared/gpu/fetch-wheels.sh` in the project root):",
        "",
        "    bash .whl/install-on-gpu.sh && export PYTHONPATH=$PWD:$PWD/.whl/site:$PWD/.whl/site-ds && "
        "bash benchmarks/gpu_check.sh",
        "",
        "Libraries: " + ", ".join(f"{key} {value}" for key, value in versions.items()) + ".",
        "",
        "## Targets",
        "",
        *targets,
        "",
        "## Parts",
        "",
        "| part | status | seconds | note |",
        "|---|---|---|---|",
        *[f"| {p.title} | **{p.status}** | {p.seconds:.1f} | {p.note} |" for p in parts],
    ]
    for index, part in enumerate(parts, start=1):
        lines += ["", f"## {index}. {part.title}", ""]
        if part.status == "skipped":
            lines.append(f"Skipped: {part.note}")
        lines += part.lines
        if part.error:
            lines += ["", "Failure:", "", *[f"    {line}" for line in part.error.strip().splitlines()[-25:]]]
    report = reporting.with_provenance("\n".join(lines) + "\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 end-to-end steps (the CPU smoke test)")
    parser.add_argument(
        "--output", type=Path, default=None, help="default: benchmarks/results/gpu_check/gpu_<device>.md"
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run, seconds")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["numerics", "end-to-end", "overhead", "deepspeed"],
        choices=["numerics", "end-to-end", "overhead", "deepspeed"],
        help="parts to run (the anchor comes with overhead)",
    )
    parser.add_argument("--deepspeed-child", type=Path, default=None, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)  # internal, with --deepspeed-child
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.deepspeed_child:
        return deepspeed_child(args.deepspeed_child, args.model_dir, device)
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if device == "cpu":
        torch.set_num_threads(1)  # steadier on a shared machine: idle OpenMP threads spin when cores are busy
    start = float(os.environ["GPU_CHECK_START"]) if os.environ.get("GPU_CHECK_START") else None
    budget = Budget(args.budget_s, start)
    settings = Settings.for_run(device, args.smoke)
    output = args.output or reporting.results_dir(STUDY) / f"gpu_{slug(device_name(device))}.md"
    command = os.environ.get("GPU_CHECK_COMMAND") or "python -m benchmarks.gpu_check " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    versions = library_versions()
    print(f"[gpu_check] {device_name(device)}; {versions}", flush=True)
    parts: dict[str, Part] = {}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        workdir = Path(tmp)

        def shared_model_dir() -> str:
            """The Qwen2-shaped checkpoint (bf16 on disk) of the numerics and overhead parts, built once."""
            directory = workdir / "model"
            if not (directory / "config.json").exists():
                overhead.build_model_dir(directory, "cuda", shape_name=settings.shape)  # "cuda": saved in bf16
            return str(directory)

        if "numerics" in args.parts:
            parts["numerics"] = run_part(
                Part("numerics", "Numerics (bf16, float32 weights under autocast)"),
                lambda: numerics(settings, workdir, shared_model_dir()),
                device,
            )
        if "end-to-end" in args.parts:
            parts["end-to-end"] = run_part(
                Part("end-to-end", f"End-to-end training ({settings.e2e_steps} steps, real generation)"),
                lambda: end_to_end(settings, workdir),
                device,
            )
        if "overhead" in args.parts:
            # Leave time for DeepSpeed (two child processes) and the report.
            reserve = settings.deepspeed_timeout_s * 0.6 if "deepspeed" in args.parts else 10.0

            def overhead_part() -> list[str]:
                results.update(
                    measure_overhead(settings, shared_model_dir(), workdir, budget.start + budget.total_s - reserve)
                )
                skipped = sorted({(b, t) for (b, t, _), v in results.items() if isinstance(v, str) and "budget" in v})
                lines = overhead_section(settings, results)
                if skipped:
                    lines += ["", "Skipped for the time budget: " + ", ".join(f"B={b} T={t}" for b, t in skipped)]
                return lines

            parts["overhead"] = run_part(
                Part("overhead", "Step time and peak memory against GRPO"), overhead_part, device
            )
        anchor_verdicts: dict[str, str] = {}
        if "overhead" in args.parts:

            def anchor_part() -> list[str]:
                lines, verdicts = anchor_section(settings, results)
                anchor_verdicts.update(verdicts)
                return lines

            parts["anchor"] = run_part(Part("anchor", "Against the H100 anchor"), anchor_part, device)
        if "deepspeed" in args.parts:
            timeout = min(settings.deepspeed_timeout_s, budget.left() - 10)

            def deepspeed_run() -> list[str]:
                if timeout < 30:
                    raise _Skipped(f"time budget spent ({budget.left():.0f} s left)")
                return deepspeed_part(settings, workdir, timeout)

            parts["deepspeed"] = run_part(Part("deepspeed", "DeepSpeed ZeRO-2 / ZeRO-3"), deepspeed_run, device)
        targets = target_rows(settings, results, anchor_verdicts) if "overhead" in args.parts else ["(not run)"]
        order = ["overhead", "anchor", "end-to-end", "numerics", "deepspeed"]
        report = write_report(
            output, settings, [parts[n] for n in order if n in parts], targets, versions, command, budget
        )
    print(report, flush=True)
    print(f"[gpu_check] report written to {output} ({budget.elapsed():.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
