"""Run one deterministic training job on several processes and save the parameter update (rank 0).

Launched by the trainer tests as
``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_layout.py ALGORITHM MODEL_DIR OUT JSON``
(gloo on CPU); JSON holds config overrides for ``trainer_harness.build_trainer``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from trainer_harness import build_trainer, exit_distributed_run, parameter_update  # noqa: E402


def main() -> None:
    algorithm, model_dir, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    trainer = build_trainer(algorithm, model_dir, str(Path(out).parent / "run"), **overrides)
    update = parameter_update(trainer)
    if trainer.accelerator.is_main_process:
        metrics = {k: v for k, v in trainer.state.log_history[0].items() if isinstance(v, float)}
        torch.save({"update": update, "metrics": metrics}, out)
    exit_distributed_run(trainer.accelerator)


if __name__ == "__main__":
    main()
