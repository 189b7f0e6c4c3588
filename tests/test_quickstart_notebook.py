"""examples/notebooks/quickstart.ipynb learns offline: CI executes it top to bottom with small settings, and the
outputs it stores (the ones the docs render) come from a full run that shows learning."""

from __future__ import annotations  # noqa: I001

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebooks" / "quickstart.ipynb"

# Inserted after the cell tagged "parameters" (papermill's convention): a small warm start and two steps.
CI_PARAMETERS = "STEPS = 2\nEVAL_PROBLEMS = 16\nEVAL_EVERY = 1\nWARM_START_EXAMPLES = 640"
RESULT = re.compile(
    r"Test accuracy before GN-IVO: ([\d.]+)%; after (\d+) steps: ([\d.]+)% \((\d+) held-out problems\)"
)


def read_notebook():
    import nbformat  # the test extra: pip install -e ".[test]"

    return nbformat.read(NOTEBOOK, as_version=4)


def stream_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def has_plot(cells) -> bool:
    return any("image/png" in output.get("data", {}) for cell in cells for output in cell.outputs)


def parameter_cell_index(notebook) -> int:
    return next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))


@pytest.mark.slow
def test_quickstart_notebook_runs_offline(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("GNIVO_TRL_CACHE", str(tmp_path / "warm-start-cache"))  # builds its own small warm start
    notebook = read_notebook()
    notebook.cells.insert(parameter_cell_index(notebook) + 1, nbformat.v4.new_code_cell(CI_PARAMETERS))
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
    assert not errors
    assert has_plot(code_cells), "the reward curve is drawn inline"
    result = RESULT.search("".join(stream_text(cell) for cell in code_cells))
    assert result and result.group(2) == "2" and result.group(4) == "16"
    assert "2 steps; saved to gnivo-quickstart" in stream_text(code_cells[-1])
    output_dir = tmp_path / "gnivo-quickstart"
    assert (output_dir / "model.safetensors").is_file()
    card = (output_dir / "README.md").read_text()
    assert "- gnivo\n" in card and "Group-Normalized Implicit Value Optimization" in card
    assert not os.path.exists(ROOT / "examples" / "notebooks" / "gnivo-quickstart")  # ran in tmp_path


def test_stored_outputs_come_from_a_full_run_that_learned():
    """What the docs render: every code cell ran, in order, with the notebook's own settings, and test accuracy rose
    by at least 15 points (`make notebook` reruns it in place)."""
    notebook = read_notebook()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    assert not [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
    assert has_plot(code_cells)
    settings = {}
    exec(notebook.cells[parameter_cell_index(notebook)].source, settings)
    result = RESULT.search("".join(stream_text(cell) for cell in code_cells))
    assert result, "the stored outputs hold the accuracy before and after"
    before, steps, after, problems = float(result[1]), int(result[2]), float(result[3]), int(result[4])
    assert (steps, problems, settings["WARM_START_EXAMPLES"]) == (settings["STEPS"], settings["EVAL_PROBLEMS"], None)
    assert after >= before + 15


def test_stored_outputs_hold_no_warning_and_no_blank_output():
    """What the docs render is what a reader gets, not the log of the machine it ran on: no stored output is a warning
    or goes to stderr (a library's notice about the machine, a deprecation), and none is empty."""
    notebook = read_notebook()
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            text = output.get("text", "") + output.get("data", {}).get("text/plain", "")
            assert output.get("name") != "stderr", f"cell {index} stored stderr: {text[:200]!r}"
            assert not re.search(r"warn", text, re.IGNORECASE), f"cell {index} stored a warning: {text[:200]!r}"
            if output.output_type == "stream":
                assert text.strip(), f"cell {index} stored an empty output"
