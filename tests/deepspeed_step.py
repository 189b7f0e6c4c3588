"""One optimizer step of each trainer under DeepSpeed ZeRO on CPU; rank 0 saves the full parameter updates.

Launched by ``test_deepspeed.py`` as
``accelerate launch --config_file CONFIG tests/deepspeed_step.py MODEL_DIR OUT [JSON]`` with two CPU processes and
``DS_ACCELERATOR=cpu``; JSON maps an algorithm to extra ``build_trainer`` settings. Parameters are gathered from
their ZeRO-3 shards by ``user_setups.full_parameters``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from trainer_harness import build_trainer, exit_distributed_run  # noqa: E402
from user_setups import full_parameters  # noqa: E402


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    results = {}
    for algorithm in ("gnivo", "vimpo"):
        settings = dict(per_device_train_batch_size=4, max_steps=1, **extra.get(algorithm, {}))
        trainer = build_trainer(algorithm, model_dir, str(out.parent / f"run-{algorithm}"), **settings)
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        before = full_parameters(trainer.model)
        trainer.train()
        after = full_parameters(trainer.model)
        loss = [entry for entry in trainer.state.log_history if "loss" in entry][0]["loss"]
        results[algorithm] = {
            "stage": stage,
            "engine": type(trainer.model_wrapped).__name__,
            "update": {name: after[name] - before[name] for name in after},
            "loss": loss,
            "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
        }
    if trainer.accelerator.is_main_process:
        torch.save(results, out)
    exit_distributed_run(trainer.accelerator)


if __name__ == "__main__":
    main()
