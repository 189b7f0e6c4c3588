"""benchmarks/gpu_check.py runs every part at a tiny shape on CPU and writes one report with finite figures.

The same code paths as the CUDA check (trainers, scoring, OOM bookkeeping aside), at sizes that take seconds; the
DeepSpeed part runs both single-process ZeRO launches on DeepSpeed's CPU accelerator when DeepSpeed is installed.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = [
    "## Targets",
    "## Parts",
    "## 1. Step time and peak memory against GRPO",
    "## 2. Against the H100 anchor",
    "## 3. End-to-end training (2 steps, real generation)",
    "## 4. Numerics (bf16, float32 weights under autocast)",
    "## 5. DeepSpeed ZeRO-2 / ZeRO-3",
]
METHODS = ["grpo", "grpo+ref", "gnivo/token", "gnivo/step", "vimpo/exact", "vimpo/k3"]


def _table_rows(report: str, heading: str) -> list[str]:
    """The rows (header and rule excluded) of the first Markdown table after ``heading``."""
    table = []
    for line in report.split(heading, 1)[1].splitlines()[1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return table[2:]


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_section(tmp_path):
    output = tmp_path / "gpu_cpu.md"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--smoke"]
    result = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = output.read_text()
    for heading in SECTIONS:
        assert heading in report, heading
    assert "bash .whl/install-on-gpu.sh" in report and "--device cpu --smoke" in report  # the exact commands
    assert re.search(r"torch [0-9]", report) and re.search(r"trl [0-9]", report)  # the library versions

    # No part failed; DeepSpeed may be skipped (with its reason) where it is not installed.
    statuses = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[1] for row in _table_rows(report, "## Parts")}
    assert len(statuses) == 5
    allowed = {"DeepSpeed ZeRO-2 / ZeRO-3": {"**ok**", "**skipped**"}}
    for part, status in statuses.items():
        assert status in allowed.get(part, {"**ok**"}), (part, status, report)

    # Every method's time ratio at every size is a finite positive number; GRPO's ratio to itself is exactly one.
    # Memory ratios too, except "n/a" where the baseline's peak did not grow at all (CPU resident set, tiny shape).
    for batch in (2, 4):
        for title in ("Step time", "Peak memory"):
            rows = _table_rows(report, f"### B={batch}: {title}")
            assert [row.split(" | ")[0].lstrip("| ") for row in rows] == METHODS
            for row in rows:
                cells = re.findall(r"\| (\S+) / (\S+)", row)
                assert len(cells) == 2, row
                values = [value for cell in cells for value in cell if not (title == "Peak memory" and value == "n/a")]
                assert all(math.isfinite(float(v)) and float(v) >= 0 for v in values), row
            if title == "Step time":
                assert all(cell.startswith("1.000 / ") for cell in rows[0].split(" | ")[1:])

    targets = _table_rows(report, "## Targets")
    assert len(targets) == 6 and all(re.search(r"\*\*(met|missed|not measured)\*\*|indicative", t) for t in targets)

    end_to_end = _table_rows(report, "## 3. End-to-end")
    assert [row.split(" | ")[0].lstrip("| ") for row in end_to_end] == ["grpo", "gnivo", "vimpo"]
    for row in end_to_end:
        cells = row.split(" | ")
        assert cells[1] == "2" and cells[5] == "none" and cells[6].startswith("**ok**"), row
        assert all(math.isfinite(float(value)) for value in cells[3].split(" / ")), row
    # VIMPO's rho and KL exactly 0 at step 1, from a training step: float32 weights and bf16 weights with bf16=True.
    zeros = _table_rows(report.split("## 3. End-to-end", 1)[1], "### Exact zeros at step 1")
    assert len(zeros) == 2 and "bf16 weights" in zeros[1], zeros
    for row in zeros:
        cells = row.split(" | ")
        assert cells[1:3] == ["0", "0"] and "vimpo/kl 0," in cells[3] and row.endswith("**exact 0** |"), row

    numerics = _table_rows(report, "## 4. Numerics")
    assert sum("loss step" in row for row in numerics) == 3
    for row in numerics:
        assert "FAILED" not in row and "nan" not in row.lower(), row
    if statuses["Numerics (bf16, float32 weights under autocast)"] == "**ok**":
        differences = [row for row in numerics if " vs " in row]
        assert len(differences) >= 10  # logp, ref_logp, token_kl (and entropy) for both weight precisions
        for row in differences:
            assert math.isfinite(float(row.split(" | ")[2])), row

    if statuses["DeepSpeed ZeRO-2 / ZeRO-3"] == "**ok**":
        rows = _table_rows(report, "## 5. DeepSpeed")
        assert {row.split(" | ")[0].lstrip("| ") for row in rows} == {"ZeRO-2", "ZeRO-3"} and len(rows) == 4
        assert all(row.endswith("**ok** |") for row in rows)
        # The shipped zero2.yaml (and zero3.yaml), VIMPO full fine-tuning: rho and the KL exactly 0 at step 1.
        zeros = _table_rows(report.split("## 5. DeepSpeed", 1)[1], "### Exact zeros at step 1")
        assert [row.split(", ")[1] for row in zeros] == ["ZeRO-2", "ZeRO-3"], zeros
        assert all(row.split(" | ")[1:3] == ["0", "0"] and row.endswith("**exact 0** |") for row in zeros), zeros
