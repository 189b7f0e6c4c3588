"""benchmarks/loss_math.py runs and its compiled variant agrees with the plain loss math."""

from benchmarks import loss_math


def test_loss_math_benchmark_writes_a_row_per_loss(tmp_path):
    output = tmp_path / "loss_math.md"
    assert loss_math.main(["--lengths", "64", "--repeats", "1", "--no-compile", "--output", str(output)]) == 0
    rows = [line for line in output.read_text().splitlines() if line.startswith("| gnivo/") or "| vimpo" in line]
    assert len(rows) == 4
    assert all(float(row.split(" | ")[2].strip("| ")) > 0 for row in rows)


def test_benchmark_losses_have_gradients():
    import torch

    inputs = loss_math.make_inputs(128)
    for name, function in loss_math.loss_functions().items():
        logp = inputs["logp"].clone().requires_grad_(True)
        loss = function(logp, inputs)
        loss.backward()
        assert torch.isfinite(loss), name
        assert logp.grad.abs().max() > 0, name
