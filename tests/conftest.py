import os  # noqa: I001  (the offline environment variables are set before any Hugging Face library is imported)

# The tests run offline: nothing may reach the Hugging Face Hub, and TRL's trainers send telemetry from __init__. Set
# here, before anything imports the Hub client; subprocesses (torchrun, accelerate launch, notebooks) inherit them.
OFFLINE_ENVIRONMENT = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
for _variable in OFFLINE_ENVIRONMENT:
    os.environ.setdefault(_variable, "1")

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny Qwen2-architecture model and its tokenizer, saved once per session."""
    from gnivo_trl.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_processes() -> list[str]:
    """The command prefix that launches a script on two local gloo processes (DDP)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    ]


def deepspeed_cpu_launch(stage: int, directory: Path) -> list[str]:
    """The command prefix that launches a script with the shipped ``examples/accelerate_configs/zero{stage}.yaml`` on
    two CPU processes. Only what a CPU run needs changes (``accelerate launch --cpu`` would drop DeepSpeed
    altogether): ``use_cpu``, two processes, and no accelerate-level mixed precision (a run's own ``bf16`` applies);
    ``zero3_init_flag`` stays as shipped. Run it with ``DS_ACCELERATOR=cpu``."""
    import yaml

    config = yaml.safe_load((TESTS.parent / "examples" / "accelerate_configs" / f"zero{stage}.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == stage
    config.update(use_cpu=True, num_processes=2, mixed_precision="no")
    path = directory / f"zero{stage}-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "--main_process_port", "0"]


def run_two_processes(algorithm: str, model_dir: str, out_dir: Path, overrides: str) -> dict:
    """Run ``distributed_layout.py`` on two gloo processes and return what rank 0 saved."""
    out = out_dir / "update.pt"
    command = [
        *torchrun_two_processes(),
        str(TESTS / "distributed_layout.py"),
        algorithm,
        model_dir,
        str(out),
        overrides,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out)


def max_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def max_magnitude(a: dict) -> float:
    return max(value.abs().max().item() for value in a.values())


def assert_refused_with_field_and_fix(config_cls, field: str, **settings) -> None:
    """Building ``config_cls(**settings)`` raises the package's error: ``<field>=<value> ...`` with why and the fix."""
    with pytest.raises(ValueError) as error:
        config_cls(**settings)
    message = str(error.value)
    assert message.startswith(f"{field}=")
    assert len(message) > len(field) + 30  # says why and what to do


LAYOUT_TOLERANCE = 1e-5  # relative to the largest parameter change


def assert_same_update(update: dict, reference: dict) -> None:
    """Two optimizer steps' parameter updates agree to LAYOUT_TOLERANCE, and the reference step did something."""
    assert max_difference(update, reference) <= LAYOUT_TOLERANCE * max_magnitude(reference)
    assert max_magnitude(reference) > 1e-3
