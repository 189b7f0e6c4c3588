"""The setups users run, one training step each: what a cell of ``test_user_setups.py`` is and how it runs.

A cell is (trainer, precision, model source, adaptation, layout). :func:`run_cell` builds the trainer as a user
would in that setup (stubbed generation from ``trainer_harness``, so every layout sees the same rows), takes one
optimizer step and returns what the test checks: the loss, VIMPO's largest ``|rho|`` and ``|KL|`` at that step (the
policy is still the reference), the credit pictures written, and every parameter's update (gathered from its
ZeRO-3 shards). Launched on two processes (``torchrun`` for DDP, ``accelerate launch`` with the shipped ZeRO
configs), ``python tests/user_setups.py MODEL_DIR OUT CELLS_JSON`` runs a list of cells and rank 0 saves the results.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trainer_harness import build_trainer, exit_distributed_run  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

TRAINERS = ("grpo", "gnivo-token", "gnivo-step", "vimpo-exact", "vimpo-candidate", "vimpo-adaptive", "credit")
PRECISIONS = ("fp32", "bf16", "fp32-weights-bf16-autocast", "fp16-autocast")
MODEL_SOURCES = ("path", "instance", "changed")
ADAPTATIONS = ("full", "lora", "lora-lm_head")
LAYOUTS = ("1p", "ddp", "zero2", "zero3")

# Config fields per trainer. GRPO and GN-IVO tokens run with beta > 0, so their reference model is built too.
TRAINER_SETTINGS = {
    "grpo": ("grpo", dict(beta=0.04)),
    "gnivo-token": ("gnivo", dict(beta=0.04)),
    "gnivo-step": ("gnivo", dict(gnivo_prefix_unit="step")),
    "vimpo-exact": ("vimpo", dict()),
    "vimpo-candidate": ("vimpo", dict(vimpo_kl_estimator="candidate_set", vimpo_candidate_kl_topk=8)),
    "vimpo-adaptive": ("vimpo", dict(vimpo_adaptive_actor_coeff=True)),
    "credit": ("gnivo", dict(gnivo_prefix_unit="step")),  # GN-IVO steps with a CreditCallback attached
}
# Whether the last model a cell loaded arrived as ZeRO-3 shards (zero.Init: a ZeRO-3 config existed before it).
LOADED: dict[str, bool] = {}
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@dataclass(frozen=True)
class Cell:
    trainer: str
    precision: str
    model: str
    adaptation: str
    layout: str

    @property
    def name(self) -> str:
        return "-".join(asdict(self).values())

    @property
    def twin(self) -> Cell:
        """The float32 single-process cell this one's update is compared with."""
        return Cell(self.trainer, "fp32", self.model, self.adaptation, "1p")


def _weights_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _changed_in_memory(model: torch.nn.Module) -> torch.nn.Module:
    """A loaded model changed in memory (as after fine-tuning it in a notebook): a fixed, seeded perturbation."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_((0.05 * noise).to(parameter.dtype))
    return model


def _model_argument(cell: Cell, model_dir: str):
    """What the user passes as ``model=``: the path; a function that loads the model after the config exists (a
    script that parses its arguments first); or a model loaded before the config and then changed in memory."""
    dtype = _weights_dtype(cell.precision)
    if cell.model == "path":
        return None
    if cell.model == "instance":

        def load_after_the_config(args):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            LOADED["zero3_shards"] = any(hasattr(parameter, "ds_id") for parameter in model.parameters())
            return model

        return load_after_the_config
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    LOADED["zero3_shards"] = any(hasattr(parameter, "ds_id") for parameter in model.parameters())
    return _changed_in_memory(model)


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full float64 value, gathered from its ZeRO-3 shards when sharded."""
    values = {}
    for name, parameter in model.named_parameters():
        gathered = contextlib.nullcontext()
        if hasattr(parameter, "ds_id"):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([parameter])
        with gathered:
            values[name] = parameter.detach().clone().double()
    return values


def _record_first_scores(trainer, record: dict) -> None:
    """Record VIMPO's largest |rho| / beta (= |log pi - log pi_ref|) and |KL| over the valid tokens of the first
    micro-batch it scores, when the policy is still the reference."""
    token_scores = trainer._token_scores

    def recording(model, inputs):
        scores = token_scores(model, inputs)
        if "max_abs_log_ratio" not in record:
            valid = inputs["completion_mask"].bool()
            record["max_abs_log_ratio"] = float((scores.logp.detach() - scores.ref_logp)[valid].abs().max())
            record["max_abs_kl"] = float(scores.token_kl[valid].abs().max())
        return scores

    trainer._token_scores = recording


def _force_cpu_fp16_autocast(trainer) -> None:
    """accelerate applies no autocast for ``fp16=True`` on CPU (``native_amp`` is False there): turn it on, so that
    the cell runs the same wrapper and float16 autocast a GPU run gets; its gradient scaler is a disabled one (one
    step of a tiny model does not underflow)."""
    accelerator = trainer.accelerator
    assert accelerator.mixed_precision == "fp16" and not accelerator.native_amp
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", enabled=False)


def build_cell_trainer(cell: Cell, model_dir: str, output_dir: str, num_processes: int = 1):
    algorithm, settings = TRAINER_SETTINGS[cell.trainer]
    settings = dict(settings, per_device_train_batch_size=8 // num_processes)
    if cell.precision in ("bf16", "fp32-weights-bf16-autocast"):
        settings["bf16"] = True
    elif cell.precision == "fp16-autocast":
        settings["fp16"] = True
    if cell.model == "path":
        settings["model_init_kwargs"] = {"dtype": _weights_dtype(cell.precision)}
    trainer_kwargs = {}
    if cell.adaptation != "full":
        modules_to_save = ["lm_head"] if cell.adaptation == "lora-lm_head" else None
        trainer_kwargs["peft_config"] = LoraConfig(**LORA, modules_to_save=modules_to_save)
    if cell.trainer == "credit":
        from gnivo_trl.credit import CreditCallback
        from gnivo_trl.testing import build_tiny_tokenizer

        prompts = [[{"role": "user", "content": "What is 3 + 4?"}]]
        trainer_kwargs["callbacks"] = [CreditCallback(build_tiny_tokenizer(), prompts, every=1, max_new_tokens=6)]
    trainer = build_trainer(
        algorithm,
        model_dir,
        output_dir,
        model=_model_argument(cell, model_dir),
        trainer_kwargs=trainer_kwargs,
        **settings,
    )
    if cell.precision == "fp16-autocast":
        _force_cpu_fp16_autocast(trainer)
    return trainer


def run_cell(cell: Cell, model_dir: str, output_dir: str, num_processes: int = 1) -> dict:
    """One optimizer step of ``cell`` in this process layout; see the module docstring for what it returns. A
    refusal (``ValueError``) is returned as ``{"refused": message}``."""
    LOADED.clear()
    try:
        trainer = build_cell_trainer(cell, model_dir, output_dir, num_processes)
    except ValueError as error:
        return {"refused": str(error)}
    result: dict = {"loaded_as_zero3_shards": LOADED.get("zero3_shards")}
    if TRAINER_SETTINGS[cell.trainer][0] == "vimpo":
        _record_first_scores(trainer, result)
    before = full_parameters(trainer.model)
    trainer.train()
    after = full_parameters(trainer.model)
    result["update"] = {name: after[name] - before[name] for name in after}
    result["loss"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0]
    if cell.trainer == "credit":
        directory = Path(output_dir) / "credit"
        result["credit_files"] = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    del trainer
    return result


def _forget_deepspeed_config() -> None:
    """Let the next cell load a model before its config exists as in a fresh script: a finished cell's ZeRO-3
    config must not make ``from_pretrained`` partition the weights."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    gc.collect()
    unset_hf_deepspeed_config()


def main() -> None:
    from accelerate import PartialState

    model_dir, out, cells = sys.argv[1], Path(sys.argv[2]), [Cell(**c) for c in json.loads(sys.argv[3])]
    results = {}
    for index, cell in enumerate(cells):
        _forget_deepspeed_config()
        results[cell.name] = run_cell(cell, model_dir, str(out.parent / f"cell-{index}"), num_processes=2)
    state = PartialState()
    if state.is_main_process:
        torch.save(results, out)
    exit_distributed_run(state)


if __name__ == "__main__":
    main()
