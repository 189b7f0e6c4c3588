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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trainer_harness import build_trainer, exit_distributed_run, start_training  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

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
    # Outside the all-pairs design: the sampled KL estimators, and the reference refresh (after every step).
    "vimpo-k2": ("vimpo", dict(vimpo_kl_estimator="k2")),
    "vimpo-k3": ("vimpo", dict(vimpo_kl_estimator="k3")),
    "vimpo-refresh": ("vimpo", dict(vimpo_update_ref_freq=1)),
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
            with FULL_SIZE.paused():  # the policy's own loading, not the reference's
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            LOADED["zero3_shards"] = any(hasattr(parameter, "ds_id") for parameter in model.parameters())
            return model

        return load_after_the_config
    with FULL_SIZE.paused():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    LOADED["zero3_shards"] = any(hasattr(parameter, "ds_id") for parameter in model.parameters())
    return _changed_in_memory(model)


class FullSizeRecord:
    """What this rank materialises at full size while a trainer builds its reference (phase ``"build"``: the
    trainer's construction, the policy's own loading excepted) and while it refreshes it (``"refresh"``: the
    ``vimpo_update_ref_freq`` callback's copy), under DeepSpeed ZeRO-3.

    A ZeRO-3 rank holds a parameter at full size only inside ``deepspeed.zero.GatheredParameters`` (every gather, in
    transformers, TRL, DeepSpeed or here, goes through it) or as an unsharded tensor, which a copy of a model makes by
    ``copy.deepcopy`` (``torch.nn.Parameter.__deepcopy__``). Both are wrapped while :meth:`recording`. Per phase:
    ``gather_parameters`` / ``gather_elements`` / ``gather_bytes`` the most parameters, elements and bytes (in their
    dtype) held gathered at the same time (nested gathers add up), ``deepcopied_*`` the parameter elements and bytes
    deep-copied; ``writes`` counts, by parameter ``id``, the gathers that wrote a parameter (``modifier_rank`` set).
    """

    def __init__(self) -> None:
        self.phase: str | None = None
        self.phases: dict[str, dict] = {}
        self.writes: dict[int, int] = {}
        self.live = [0, 0, 0]  # parameters, elements, bytes gathered now

    def _current(self) -> dict | None:
        if self.phase is None:
            return None
        return self.phases.setdefault(
            self.phase,
            dict(gather_parameters=0, gather_elements=0, gather_bytes=0, deepcopied_elements=0, deepcopied_bytes=0),
        )

    @contextlib.contextmanager
    def recording(self, phase: str):
        import deepspeed

        gathered_class = deepspeed.zero.GatheredParameters
        enter, exit_, deepcopy = gathered_class.__enter__, gathered_class.__exit__, torch.nn.Parameter.__deepcopy__
        record = self

        def recorded_enter(context):
            current = record._current()
            if current is not None and context.enabled:
                size = [
                    len(context.params),
                    sum(p.ds_numel for p in context.params),
                    sum(p.ds_numel * p.element_size() for p in context.params),
                ]
                context.recorded_size = size
                record.live = [now + more for now, more in zip(record.live, size)]
                for key, now in zip(("gather_parameters", "gather_elements", "gather_bytes"), record.live):
                    current[key] = max(current[key], now)
                if context.src_rank is not None:
                    for parameter in context.params:
                        record.writes[id(parameter)] = record.writes.get(id(parameter), 0) + 1
            return enter(context)

        def recorded_exit(context, *exc):
            size = getattr(context, "recorded_size", None)
            if size is not None:
                record.live = [now - less for now, less in zip(record.live, size)]
                del context.recorded_size
            return exit_(context, *exc)

        def recorded_deepcopy(parameter, memo):
            current = record._current()
            if current is not None:
                current["deepcopied_elements"] += parameter.numel()
                current["deepcopied_bytes"] += parameter.numel() * parameter.element_size()
            return deepcopy(parameter, memo)

        gathered_class.__enter__, gathered_class.__exit__ = recorded_enter, recorded_exit
        torch.nn.Parameter.__deepcopy__ = recorded_deepcopy
        self.phase = phase
        try:
            yield self
        finally:
            self.phase = None
            gathered_class.__enter__, gathered_class.__exit__ = enter, exit_
            torch.nn.Parameter.__deepcopy__ = deepcopy

    def clear(self) -> None:
        self.phases.clear()
        self.writes.clear()
        self.live = [0, 0, 0]

    @contextlib.contextmanager
    def paused(self):
        phase, self.phase = self.phase, None
        try:
            yield
        finally:
            self.phase = phase

    def record_refreshes(self, trainer) -> None:
        """Record the reference refresh of ``trainer`` (TRL's ``SyncRefModelCallback`` or a subclass) as ``"refresh"``."""
        from trl.trainer.callbacks import SyncRefModelCallback

        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, SyncRefModelCallback):
                sync = callback.sync_target_model

                def recorded_sync(model, target_model, alpha, sync=sync):
                    with self.recording("refresh"):
                        sync(model, target_model, alpha)

                callback.sync_target_model = recorded_sync


FULL_SIZE = FullSizeRecord()


def _elements(model: torch.nn.Module) -> tuple[int, int]:
    """(largest parameter, all parameters) of a model, in elements (full sizes also for ZeRO-3 shards)."""
    sizes = [getattr(p, "ds_numel", p.numel()) for p in model.parameters()]
    return max(sizes), sum(sizes)


def _place_elsewhere(model: torch.nn.Module) -> Callable[[], None]:
    """Move ``model``'s parameters and buffers to the ``meta`` device (another device than the CPU the policy is on;
    tied parameters stay tied); returns what puts the originals back."""
    originals = [(module, dict(module._parameters), dict(module._buffers)) for module in model.modules()]
    moved: dict[int, torch.Tensor] = {}

    def on_meta(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        if id(tensor) not in moved:
            empty = torch.empty_like(tensor, device="meta")
            moved[id(tensor)] = (
                torch.nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else empty
            )
        return moved[id(tensor)]

    for module, parameters, buffers in originals:
        module._parameters.update({name: on_meta(value) for name, value in parameters.items()})
        module._buffers.update({name: on_meta(value) for name, value in buffers.items()})

    def put_back() -> None:
        for module, parameters, buffers in originals:
            module._parameters.update(parameters)
            module._buffers.update(buffers)

    return put_back


@contextlib.contextmanager
def reference_placed_before_the_policy():
    """DeepSpeed's order of placement, on one CPU process.

    Under DeepSpeed (ZeRO-1/2/3), transformers' ``Trainer`` leaves the policy where it was loaded (the CPU) until
    ``train()`` places it, while TRL's ``prepare_deepspeed`` has already moved the reference to ``cuda:N`` when the
    trainer is built. Here every model prepared for evaluation while the context is open (the reference: by TRL, or
    by ``GroupBookkeepingMixin`` for a copy) is moved to ``meta``, the device other than the CPU that a CPU has; the
    policy stays on the CPU. Yields ``place``: ``place(model)`` puts a model moved this way back (what ``train()``
    achieves on a GPU: both on one device), ``place(model, elsewhere=True)`` moves a placed one away again.
    """
    from accelerate import Accelerator

    prepare_model = Accelerator.prepare_model
    put_back: dict[int, Callable[[], None]] = {}

    def prepare_and_place_elsewhere(self, model, device_placement=None, evaluation_mode=False):
        model = prepare_model(self, model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        if evaluation_mode:
            put_back[id(model)] = _place_elsewhere(model)
        return model

    def place(model: torch.nn.Module, elsewhere: bool = False) -> None:
        if elsewhere:
            put_back[id(model)] = _place_elsewhere(model)
        else:
            put_back.pop(id(model))()

    Accelerator.prepare_model = prepare_and_place_elsewhere
    try:
        yield place
    finally:
        Accelerator.prepare_model = prepare_model


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


def run_cell(
    cell: Cell, model_dir: str, output_dir: str, num_processes: int = 1, reference_placed_first: bool = False
) -> dict:
    """One optimizer step of ``cell`` in this process layout; see the module docstring for what it returns. A
    refusal (``ValueError``) is returned as ``{"refused": message}``.

    Under ZeRO-3 (and for the credit callback) ``"this_rank"`` holds what this rank did, for the launch to gather:
    ``FullSizeRecord``'s figures, and whether the callback holds a copy of the policy. ``reference_placed_first``
    builds the trainer in DeepSpeed's order of placement (``reference_placed_before_the_policy``), lets ``train()``
    place the reference with the policy, and afterwards returns, for VIMPO, what scoring with the heads apart raises
    (``"refused_apart"``).
    """
    LOADED.clear()
    FULL_SIZE.clear()
    placement = reference_placed_before_the_policy() if reference_placed_first else contextlib.nullcontext()
    recording = FULL_SIZE.recording("build") if cell.layout == "zero3" else contextlib.nullcontext()
    try:
        with placement as place, recording:
            trainer = build_cell_trainer(cell, model_dir, output_dir, num_processes)
    except ValueError as error:
        return {"refused": str(error)}
    result: dict = {"loaded_as_zero3_shards": LOADED.get("zero3_shards"), "this_rank": {}}
    algorithm = TRAINER_SETTINGS[cell.trainer][0]
    if reference_placed_first and trainer.ref_model is not None:
        heads = (
            trainer.accelerator.unwrap_model(m).get_output_embeddings().weight
            for m in (trainer.model, trainer.ref_model)
        )
        result["head_devices_when_built"] = [str(head.device) for head in heads]
        trainer.callback_handler.callbacks.insert(0, _PlaceOnTrainBegin(place, trainer.ref_model))
    if algorithm == "vimpo":
        _record_first_scores(trainer, result)
    if cell.layout == "zero3":
        FULL_SIZE.record_refreshes(trainer)
        reference = trainer.accelerator.unwrap_model(trainer.ref_model) if trainer.ref_model is not None else None
        if reference is not None:
            writes = [FULL_SIZE.writes.get(id(p), 0) for p in reference.parameters()]
            result["this_rank"]["reference_writes_when_built"] = (min(writes), max(writes))
        result["this_rank"]["elements"] = _elements(trainer.model)
    before = full_parameters(trainer.model)
    trainer.train()
    after = full_parameters(trainer.model)
    result["update"] = {name: after[name] - before[name] for name in after}
    result["loss"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][0]
    if cell.layout == "zero3":
        result["this_rank"]["full_size"] = dict(FULL_SIZE.phases)
    if getattr(trainer.args, "vimpo_update_ref_freq", 0):  # refreshed after the step: equal to the policy
        reference = full_parameters(trainer.accelerator.unwrap_model(trainer.ref_model))
        result["reference_equals_policy"] = all(torch.equal(after[name], reference[name]) for name in after)
    if cell.trainer == "credit":
        directory = Path(output_dir) / "credit"
        result["credit_files"] = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        (callback,) = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "CreditCallback"]
        result["this_rank"]["credit_holds_a_copy"] = callback.reference is not None
    if reference_placed_first and algorithm == "vimpo":
        place(trainer.ref_model, elsewhere=True)
        start_training(trainer)
        batch = trainer._generate_and_score_completions(list(trainer.train_dataset.select(range(2)).repeat(4)))
        try:
            trainer.compute_loss(trainer.model, batch)
        except ValueError as error:
            result["refused_apart"] = str(error)
    del trainer
    return result


class _PlaceOnTrainBegin(TrainerCallback):
    """What ``train()`` does under DeepSpeed before any callback runs: the policy joins the reference's device (here:
    the reference, moved elsewhere while the trainer was built, comes back to the policy's)."""

    def __init__(self, place: Callable, reference: torch.nn.Module):
        self.place, self.reference = place, reference

    def on_train_begin(self, args, state, control, **kwargs):
        self.place(self.reference)


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
    state = PartialState()
    for index, cell in enumerate(cells):
        _forget_deepspeed_config()
        result = run_cell(cell, model_dir, str(out.parent / f"cell-{index}"), num_processes=2)
        per_rank = [None] * state.num_processes
        torch.distributed.all_gather_object(per_rank, result.pop("this_rank", {}))
        results[cell.name] = {**result, "per_rank": per_rank}
    if state.is_main_process:
        torch.save(results, out)
    exit_distributed_run(state)


if __name__ == "__main__":
    main()
