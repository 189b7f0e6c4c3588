"""Run one deterministic training job on several processes and save the parameter update (rank 0).

Launched by the trainer tests as
``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_layout.py ALGORITHM MODEL_DIR OUT JSON``
(gloo on CPU); JSON holds config overrides for ``trainer_harness.build_trainer``.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from trainer_harness import build_trainer, parameter_update  # noqa: E402


def main() -> None:
    algorithm, model_dir, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    trainer = build_trainer(algorithm, model_dir, str(Path(out).parent / "run"), **overrides)
    update = parameter_update(trainer)
    if trainer.accelerator.is_main_process:
        metrics = {k: v for k, v in trainer.state.log_history[0].items() if isinstance(v, float)}
        torch.save({"update": update, "metrics": metrics}, out)
    # Shut the process group down in step on every rank: left to interpreter exit, gloo's threads can abort a rank
    # ("terminate called without an active exception") after the work is done.
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without interpreter teardown: with the work saved and the process group destroyed, a rank could still
    # abort in C++ static destruction (gloo/c10d threads: "terminate called without an active exception", seen about
    # once in ten runs), which the launcher reports as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
