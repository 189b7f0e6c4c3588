"""examples/notebooks/quickstart.ipynb executes offline, top to bottom, and leaves a trained, saved model."""

from __future__ import annotations  # noqa: I001

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_offline(tmp_path, monkeypatch):
    import nbformat  # the test extra: pip install -e ".[test]"
    from nbclient import NotebookClient

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
    assert not errors
    last_output = "".join(o.get("text", "") for o in code_cells[-1].outputs if o.output_type == "stream")
    assert "2 steps; saved to gnivo-quickstart" in last_output
    output_dir = tmp_path / "gnivo-quickstart"
    assert (output_dir / "model.safetensors").is_file()
    card = (output_dir / "README.md").read_text()
    assert "- gnivo\n" in card and "Group-Normalized Implicit Value Optimization" in card
    assert not os.path.exists(ROOT / "examples" / "notebooks" / "gnivo-quickstart")  # ran in tmp_path
