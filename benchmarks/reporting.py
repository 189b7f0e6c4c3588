"""Where each study writes its results, and the provenance line every results file carries.

Every study has its own folder under ``benchmarks/results/`` (:data:`STUDIES`); superseded files live in
``benchmarks/results/archive/``, each opening with a line that names what replaced it. Every Markdown report a study
writes goes through :func:`write_report`, which puts a provenance line under its title: the package commit the
results were produced with (``git rev-parse`` of the checkout, and whether its ``gnivo_trl/`` or ``benchmarks/``
had uncommitted changes) and the torch / transformers / TRL versions. Reports built from cached runs name every
commit their runs were produced at (each run records its own :func:`provenance` when it is trained). Plots carry the
same line in their PNG metadata (:func:`png_metadata`).
"""

from __future__ import annotations

import functools
import platform
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
ARCHIVE = RESULTS / "archive"
STUDIES = (
    "learning",
    "fair_comparison",
    "paper_claims",
    "noise_controls",
    "agents",
    "credit",
    "overhead",
    "gpu_check",
    "flops",
    "trainer_metrics",
)


def results_dir(study: str) -> Path:
    """``benchmarks/results/<study>/`` (created if missing)."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; expected one of {', '.join(STUDIES)}")
    path = RESULTS / study
    path.mkdir(parents=True, exist_ok=True)
    return path


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


@functools.cache
def provenance() -> dict:
    """The code and libraries this process runs: ``commit`` (full hash, or ``"unknown"`` outside a git checkout),
    ``dirty`` (uncommitted changes under ``gnivo_trl/`` or ``benchmarks/``, results excluded; None when unknown),
    ``torch``, ``transformers``, ``trl`` and ``python`` versions. Computed once per process, at the first call: each
    study's ``main`` calls it first, so a long run records the commit it was started from, not a later one."""
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--", "gnivo_trl", "benchmarks", ":(exclude)benchmarks/results")
        dirty = bool(status) if status is not None else None
    return {
        "commit": commit or "unknown",
        "dirty": dirty,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "python": platform.python_version(),
    }


def _describe(record: dict) -> str:
    commit = record.get("commit", "unknown")
    short = commit[:10] if commit != "unknown" else "unknown (not a git checkout)"
    state = {True: " with uncommitted changes", False: "", None: ""}[record.get("dirty")]
    return f"{short}{state}"


def provenance_line(runs: Iterable[dict] = ()) -> str:
    """One Markdown line: the package commit(s) and library versions.

    ``runs``: cached run records (each with its own ``provenance``); when given, every commit / version set they were
    produced with is listed with its run count, then the commit that wrote the report.
    """
    here = provenance()
    produced = Counter()
    for run in runs:
        record = run.get("provenance")
        if record is None:
            produced["(not recorded)"] += 1
            continue
        produced[
            f"{_describe(record)} (torch {record['torch']}, transformers {record['transformers']}, TRL {record['trl']})"
        ] += 1
    libraries = (
        f"torch {here['torch']}, transformers {here['transformers']}, TRL {here['trl']}, Python {here['python']}"
    )
    if not produced:
        return f"Provenance: package commit {_describe(here)}; {libraries}."
    listed = "; ".join(f"{what}: {count} run{'s' * (count != 1)}" for what, count in produced.items())
    return f"Provenance: runs produced at package commit {listed}. Report written at {_describe(here)}; {libraries}."


def with_provenance(text: str, runs: Iterable[dict] = ()) -> str:
    """``text`` with :func:`provenance_line` inserted after its first line (the title) and a blank line."""
    first, _, rest = text.partition("\n")
    return f"{first}\n\n{provenance_line(runs)}\n\n{rest.lstrip(chr(10))}"


def write_report(path: str | Path, text: str, runs: Iterable[dict] = ()) -> Path:
    """Write a Markdown report with its provenance line (see :func:`with_provenance`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(with_provenance(text, runs))
    return path


def png_metadata(runs: Iterable[dict] = ()) -> dict[str, str]:
    """``savefig(metadata=...)`` for a plot: the provenance line as the PNG's ``Description``."""
    return {"Description": provenance_line(runs), "Software": "gnivo-trl benchmarks"}
