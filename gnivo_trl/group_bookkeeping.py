"""Trainer plumbing shared by GNIVOTrainer and VIMPOTrainer: raw rewards, group identity and whole-group batches.

TRL's `GRPOTrainer` turns rewards into advantages inside `_generate_and_score_completions` and then shuffles the
rows of a generation batch one by one before cutting it into micro-batches. Both of our losses need more than an
advantage per row: the raw reward, the row's group, and statistics of the whole group, which may be spread over
processes. This mixin

* stashes the gathered per-function rewards (`_calculate_rewards` is the only hook that sees them) and attaches
  to every row its raw reward (`row_rewards`) and global group index (`row_group_index`);
* hands the subclass the gathered, global rewards so that it can attach per-row group statistics computed on whole
  groups (`_add_group_statistics`), then sliced back to the local rows;
* when `per_device_train_batch_size` is a multiple of the group size, shuffles whole groups instead of rows, so
  that every micro-batch holds complete groups;
* builds the reference of a policy passed as an instance as a copy of it, taken before TRL patches the policy and
  then prepared exactly as TRL prepares its own (TRL would reload `config._name_or_path`, which an instance changed
  in memory no longer is, or which a model built from a config does not have); under DeepSpeed ZeRO-3 the copy is
  built sharded from the config, without initialisation, and filled one parameter at a time, and a refresh
  (`sync_ref_model`, VIMPO's `vimpo_update_ref_freq`) copies one parameter at a time too;
* turns bad input into clear errors or documented behaviour: a dataset without a `prompt` column is refused at
  construction (unless an `environment_factory` supplies the prompts, as TRL allows), an exception in a reward function
  is re-raised as [`RewardFunctionError`][gnivo_trl.RewardFunctionError] naming the function, and a row whose weighted
  reward is not finite (NaN, +inf or -inf) has no reward and leaves its group, with a warning for infinities;
* warns at construction when a PEFT adapter's `modules_to_save` unties a tied LM head from the input embeddings;
* writes TRL's model card also when the user saves the model (`save_model`), not only at checkpoints and on push, and
  names a base model without a Hub id (a local folder) and a model not pushed by where they are, instead of "None".

Every value attached to the batch is a tensor with the batch as its first dimension, so TRL's shuffling, splitting
and buffering carry it along.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import traceback
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer, SyncRefModelCallback
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer import add_fused_lm_head, disable_dropout_in_model

from ._trl_private import profiled, trl_private

__all__ = [
    "GroupBookkeepingMixin",
    "ParameterwiseSyncRefModelCallback",
    "RewardFunctionError",
    "copy_parameters_one_at_a_time",
    "loss_mask",
    "prompt_completion_sequences",
    "shuffle_whole_groups",
]

logger = logging.getLogger(__name__)

_GRPO_INIT = inspect.signature(GRPOTrainer.__init__)

# GRPOTrainer builds the frozen reference model only when beta != 0. A trainer that needs it with GRPO's KL penalty off
# (VIMPO) constructs with this stand-in beta, then restores its own.
_BUILD_REFERENCE_BETA = 1.0
_GRPO_FILE = inspect.getsourcefile(GRPOTrainer)


# Multimodal inputs GRPOTrainer._get_per_token_logps_and_entropies accepts; passed through when the batch has them.
_MULTIMODAL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class RewardFunctionError(RuntimeError):
    """A reward function raised. The message names the function; the original exception is the `__cause__`.

    Examples:
        ```python
        from gnivo_trl import RewardFunctionError

        try:
            raise RewardFunctionError("reward function 'my_reward' raised KeyError")
        except RewardFunctionError as error:
            print(error)  # in training, error.__cause__ is the original exception
        ```
    """


def shuffle_whole_groups(batch: dict[str, Any], group_size: int) -> dict[str, Any]:
    """Permute the groups of a batch (rows `[g*K, (g+1)*K)`), keeping each group's rows together and in order.

    Like TRL's `shuffle_sequence_dict`, tensors with `ndim >= 1` and lists are permuted along their first
    dimension, 0-d tensors and None are left alone, and the permutation comes from the global torch RNG.
    """
    num_rows = len(next(v for v in batch.values() if v is not None and not _is_scalar(v)))
    if num_rows % group_size:
        raise ValueError(f"A batch of {num_rows} rows does not hold whole groups of {group_size}.")
    group_order = torch.randperm(num_rows // group_size)
    permutation = (group_order[:, None] * group_size + torch.arange(group_size)).flatten()

    def permute(value):
        if value is None or _is_scalar(value):
            return value
        if isinstance(value, torch.Tensor):
            return value[permutation.to(value.device)]
        return [value[i] for i in permutation.tolist()]

    return {key: permute(value) for key, value in batch.items()}


def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
    """The `(B, T)` mask of tokens that take part in the loss: completion tokens, less tool output."""
    mask = batch["completion_mask"]
    return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]


def prompt_completion_sequences(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(prompt + completion ids, their attention mask, number of completion positions)` of a scored batch."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask, batch["completion_ids"].size(1)


def _is_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 0


def _check_prompt_column(dataset, argument: str, has_environment: bool = False) -> None:
    """Refuse a dataset (or a dict of datasets) whose known columns do not include `prompt`.

    With an `environment_factory` (`has_environment`) the column is optional, as in TRL: a row without it starts
    from an empty user message and the environment's `reset()` supplies the prompt, so any columns are accepted.
    """
    if dataset is None or has_environment:
        return
    if isinstance(dataset, dict):
        for name, split in dataset.items():
            _check_prompt_column(split, f"{argument}[{name!r}]")
        return
    columns = getattr(dataset, "column_names", None)  # None for an IterableDataset of unknown features
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"{argument} has no 'prompt' column (its columns are {sorted(columns)}). The trainers, like TRL's "
            "GRPOTrainer, sample completions for the 'prompt' of each row: rename the column holding the prompts "
            "(dataset.rename_column(old, 'prompt')) or map the rows to a 'prompt' field (chat messages or text). "
            "Only with an environment_factory, whose reset() returns the prompt, may the column be absent."
        )


def _failing_reward_function(error: BaseException) -> str | None:
    """Name of the reward function an exception escaped from, read off TRL's `_calculate_rewards` frames.

    Returns None when the exception was raised by TRL itself (its own errors already name the function) or when no
    reward-function frame is on the traceback.
    """
    frames = list(traceback.walk_tb(error.__traceback__))
    if not frames or frames[-1][0].f_code.co_filename == _GRPO_FILE:
        return None
    for frame, _ in reversed(frames):
        if frame.f_code.co_filename != _GRPO_FILE:
            continue
        for variable in ("reward_func_name", "func_name"):  # the synchronous loop / the asyncio path
            name = frame.f_locals.get(variable)
            if isinstance(name, str):
                return name
    return None


def _is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are DeepSpeed ZeRO-3 shards: loaded while a ZeRO-3 config was alive (a
    `TrainingArguments` built before `from_pretrained`, with `zero3_init_flag`), which `zero.Init` partitions."""
    return any(hasattr(parameter, "ds_id") for parameter in model.parameters())


def _no_init_weights():
    """transformers' context that skips weight initialisation while a model is built (what `from_pretrained` builds
    under before it loads the weights): `transformers.initialization.no_init_weights` from transformers 5,
    `transformers.modeling_utils.no_init_weights` before."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _gathered(parameter: torch.nn.Parameter, modifier_rank: int | None = None):
    """DeepSpeed's `GatheredParameters` of one parameter: its full value on every rank inside the context (a no-op
    for a parameter that is not a ZeRO-3 shard); with `modifier_rank`, that rank's value is kept on exit."""
    import deepspeed

    return deepspeed.zero.GatheredParameters([parameter], modifier_rank=modifier_rank)


def copy_parameters_one_at_a_time(source: torch.nn.Module, target: torch.nn.Module, alpha: float = 1.0) -> None:
    """`target <- (1 - alpha) * target + alpha * source` for every parameter, one parameter at a time; `alpha=1` is
    an exact copy (the target's old value, possibly uninitialised memory, is not read). Parameters are matched by name
    (tied ones once); buffers, which ZeRO-3 never partitions, are not touched.

    Either model may hold ZeRO-3 shards: each parameter is then gathered alone (the source's and the target's, the
    target written on rank 0 and broadcast), so no rank ever holds more than one parameter of each model at full size.
    TRL's `SyncRefModelCallback` gathers every parameter of both models at once instead. Every rank must call this.

    Raises:
        ValueError: the two models do not have the same parameter names.
    """
    targets = dict(target.named_parameters())
    sources = dict(source.named_parameters())
    if targets.keys() != sources.keys():
        raise ValueError(
            f"Cannot copy {type(source).__name__} into {type(target).__name__}: their parameters differ "
            f"(only in the source: {sorted(sources.keys() - targets.keys())[:5]}; only in the target: "
            f"{sorted(targets.keys() - sources.keys())[:5]})."
        )
    with torch.no_grad():
        for name, source_parameter in sources.items():
            target_parameter = targets[name]
            with _gathered(source_parameter), _gathered(target_parameter, modifier_rank=0):
                if hasattr(target_parameter, "ds_id") and torch.distributed.get_rank() != 0:
                    continue  # a shard: rank 0 writes the gathered value, which the context then broadcasts
                if alpha == 1.0:
                    target_parameter.data.copy_(source_parameter.data)
                else:
                    target_parameter.data.mul_(1.0 - alpha).add_(source_parameter.data, alpha=alpha)


def initial_policy_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` as it is now, for the reference of a policy passed as an instance.

    Outside DeepSpeed ZeRO-3 the model is deep-copied. Under ZeRO-3 (a ZeRO-3 config is alive: the trainer's
    `TrainingArguments` exist) no rank ever holds the whole copy: the architecture is built from the model's config
    inside `deepspeed.zero.Init` (each parameter partitioned as its module is created, as `from_pretrained` loads
    under ZeRO-3) without initialising any weight, then filled parameter by parameter from the policy (whole on every
    rank if it was loaded before the config, shards if after: `copy_parameters_one_at_a_time`); the buffers are the
    policy's. Every rank must call this.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        if _is_zero3_partitioned(model):
            raise ValueError(
                "The model's parameters are DeepSpeed ZeRO-3 shards, but no ZeRO-3 configuration is alive: build the "
                "trainer's config (accelerate launch with a ZeRO-3 config) before loading the model, and keep it."
            )
        return copy.deepcopy(model).eval().requires_grad_(False)
    import deepspeed
    from transformers.integrations import deepspeed_config

    with _no_init_weights(), deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        reference = type(model)(copy.deepcopy(model.config))
    reference.tie_weights()  # what initialisation would have done: tied parameters are one
    copy_parameters_one_at_a_time(model, reference)
    buffers = dict(model.named_buffers())
    for name, buffer in reference.named_buffers():
        # Assigned, not copied into: zero.Init may have built a float buffer (RoPE's inv_freq) in its own dtype. On the
        # device zero.Init put the reference on, which the policy, if loaded before the config, is not on yet.
        buffer.data = buffers[name].detach().to(device=buffer.device, copy=True)
    return reference.eval().requires_grad_(False)


def warn_if_adapter_unties_embeddings(model: torch.nn.Module) -> None:
    """Warn when a PEFT adapter's `modules_to_save` gives a model that ties its LM head to its input embeddings
    (`tie_word_embeddings`) a trainable copy of one of them that the other does not share: PEFT then unties them, and
    the adapter trains and saves a full copy (for SmolLM2-135M the adapter grows from about 10 MB to 123 MB)."""
    if not is_peft_model(model):
        return
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or head is None or embeddings is None:
        return

    def weights(module: torch.nn.Module) -> list[torch.Tensor]:
        if isinstance(module, ModulesToSaveWrapper):
            return [copy.weight for copy in module.modules_to_save.values()]
        return [module.weight]

    if {id(w) for w in weights(head)} & {id(w) for w in weights(embeddings)}:
        return  # still tied (untouched, or PEFT's ensure_weight_tying=True)
    copied = head if isinstance(head, ModulesToSaveWrapper) else embeddings
    weight = weights(copied)[0]
    logger.warning(
        "The PEFT adapter's modules_to_save makes a trainable copy of the %s (%s, %.1f MB), which this model ties to "
        "its %s (tie_word_embeddings=True): PEFT unties them, so the adapter trains and saves that full copy while "
        "the %s keep the base weights. To keep them tied, set ensure_weight_tying=True in the LoraConfig; for a "
        "small adapter, leave the %s out of modules_to_save.",
        "LM head" if copied is head else "input embeddings",
        " x ".join(str(size) for size in weight.shape),
        weight.numel() * weight.element_size() / 1e6,
        "input embeddings" if copied is head else "LM head",
        "input embeddings" if copied is head else "LM head",
        "LM head" if copied is head else "input embeddings",
    )


def _card_without_missing_hub_ids(card: str, base_model: str, saved_in: str) -> str:
    """TRL's card text with the base model and the model's own Hub id named where TRL writes "None": the local
    folder a base model was loaded from (or "a model built in memory"), and the directory the model is saved in."""
    base = f"the local model `{Path(base_model).name}`" if base_model else "a model built in memory"
    card = card.replace("[None](https://huggingface.co/None)", base)
    return card.replace('model="None"', f"model={json.dumps(saved_in)}")


class ParameterwiseSyncRefModelCallback(SyncRefModelCallback):
    """TRL's `SyncRefModelCallback` (same schedule and mixing: `ref_model_sync_steps`, `ref_model_mixup_alpha`),
    copying under DeepSpeed ZeRO-3 one parameter at a time (`copy_parameters_one_at_a_time`) instead of gathering
    every parameter of the policy and of the reference at once (two whole models on every rank)."""

    @staticmethod
    def sync_target_model(model, target_model, alpha):
        from accelerate.state import AcceleratorState

        plugin = AcceleratorState().deepspeed_plugin
        if plugin is None or plugin.zero_stage != 3:  # TRL's own test
            SyncRefModelCallback.sync_target_model(model, target_model, alpha)
            return
        copy_parameters_one_at_a_time(model, getattr(target_model, "module", target_model), alpha)


def cast_output_head_to_float32(model: torch.nn.Module) -> None:
    """What `cast_lm_head_to_fp32` does to a model: its output head's weights in float32 and its projection
    computed in float32; a tied input embedding (which shares the weights) keeps handing the rest of the model
    activations of the dtype the rest of the model is in when it runs (read then, not now: DeepSpeed under bf16 casts
    every parameter, the head included, when it prepares the model)."""
    head = model.get_output_embeddings()
    head.float()

    def float32_projection(hidden_states: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(hidden_states.float(), head.weight.float(), bias)

    head.forward = float32_projection
    embeddings = model.get_input_embeddings()
    if embeddings.weight is head.weight:

        def in_the_model_dtype(module, args, output):
            others = (p.dtype for p in model.parameters() if p is not head.weight and p.is_floating_point())
            return output.to(next(others, output.dtype))

        embeddings.register_forward_hook(in_the_model_dtype)


class GroupBookkeepingMixin:
    """Mixed in before `GRPOTrainer`; subclasses implement `_add_group_statistics` and `_compute_loss`."""

    _stashed_rewards_per_func: torch.Tensor | None = None

    def __init__(self, *args, **kwargs):
        bound = _GRPO_INIT.bind(self, *args, **kwargs)
        has_environment = bound.arguments.get("environment_factory") is not None
        _check_prompt_column(bound.arguments.get("train_dataset"), "train_dataset", has_environment)
        _check_prompt_column(bound.arguments.get("eval_dataset"), "eval_dataset", has_environment)
        model, config = bound.arguments["model"], bound.arguments["args"]
        # TRL reloads the reference from config._name_or_path, so a policy passed as an instance (changed in memory:
        # fine-tuned in the same notebook, or built from a config with no path at all) would get a reference that is
        # not the initial policy, or none. Such a policy's reference is a copy of it, taken here, before TRL patches
        # the policy; TRL is then asked for no reference, and the copy is prepared as TRL prepares its own. A model
        # given by name or path is left to TRL, and so is a PEFT model (its reference is the adapter disabled).
        reference_copy = None
        if (
            self._needs_reference_model(config)
            and not isinstance(model, str)
            and not is_peft_model(model)
            and bound.arguments.get("peft_config") is None
        ):
            reference_copy = initial_policy_copy(model)
        beta, sync_ref_model = config.beta, config.sync_ref_model
        if reference_copy is not None:
            config.beta, config.sync_ref_model = 0.0, False
        elif self._needs_reference_model(config):
            # GRPOTrainer builds its reference (a reload, or a "ref" adapter for a pre-trained PEFT adapter) only
            # when beta != 0; a trainer that needs it without GRPO's KL term builds with a stand-in beta.
            config.beta = config.beta or _BUILD_REFERENCE_BETA
        try:
            super().__init__(*args, **kwargs)
        finally:
            config.beta, config.sync_ref_model = beta, sync_ref_model
        self.beta = beta
        if reference_copy is not None:
            self.ref_model = self._prepared_reference(reference_copy)
        warn_if_adapter_unties_embeddings(self.model)

    def _needs_reference_model(self, config) -> bool:
        """Whether the loss uses the frozen reference model (GRPO's KL penalty, beta != 0, by default)."""
        return config.beta != 0.0

    def _prepared_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        """A copy of the initial policy made into the reference exactly as `GRPOTrainer` makes its own: dropout off
        (`disable_dropout`), the head in float32 (`cast_lm_head_to_fp32`), TRL's fused LM head at the sampling
        temperature, prepared by DeepSpeed (sharded under ZeRO-3), FSDP or accelerate for evaluation, and kept in
        step with the policy by `sync_ref_model`."""
        args = self.args
        if args.disable_dropout:
            disable_dropout_in_model(reference)
        if args.cast_lm_head_to_fp32:
            cast_output_head_to_float32(reference)
        add_fused_lm_head(reference, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            reference = prepare_deepspeed(reference, self.accelerator)
        elif self.is_fsdp_enabled:
            reference = prepare_fsdp(reference, self.accelerator)
        else:
            reference = self.accelerator.prepare_model(reference, evaluation_mode=True)
        if args.sync_ref_model:
            self.add_callback(ParameterwiseSyncRefModelCallback(ref_model=reference, accelerator=self.accelerator))
        return reference

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
    ) -> None:
        """TRL's model card (the method, its paper and citation, the tags; `GRPOTrainer.create_model_card`), written
        to `output_dir/README.md` (default `args.output_dir`, TRL's place).

        Where TRL's card would say "a fine-tuned version of [None]" and `pipeline(model="None")` (a base model
        loaded from a local folder or built in memory, a model not pushed to the Hub), it names the local base model
        and the directory the card is saved in.
        """
        directory = self.args.output_dir if output_dir is None else str(output_dir)
        configured, self.args.output_dir = self.args.output_dir, directory  # TRL writes to args.output_dir
        try:
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        finally:
            self.args.output_dir = configured
        if self.is_world_process_zero():
            card = Path(directory) / "README.md"
            card.write_text(
                _card_without_missing_hub_ids(card.read_text(), self.model.config.name_or_path or "", directory),
                encoding="utf-8",
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; a save of the user's own (not the trainer's checkpoints or `push_to_hub`, which
        write the card themselves) writes the model card into the directory first, so that a run with
        `save_strategy="no"` has one. A PEFT adapter's save then adds its metadata to that card, as at TRL's
        checkpoints, instead of writing PEFT's blank template."""
        if not _internal_call:
            directory = self.args.output_dir if output_dir is None else str(output_dir)
            hub_id = self.args.hub_model_id
            self.create_model_card(
                model_name=hub_id.split("/")[-1] if hub_id else Path(directory).name, output_dir=directory
            )
        super().save_model(output_dir, _internal_call)

    @property
    def _keeps_groups_whole(self) -> bool:
        """Whether training micro-batches hold whole groups (the group-level shuffle is then used)."""
        return self.args.per_device_train_batch_size % self.num_generations == 0

    def _group_size(self, mode: str) -> int:
        return self.num_generations if mode == "train" else self.num_generations_eval

    @profiled
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        try:
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        except Exception as error:
            name = _failing_reward_function(error)
            if name is None:
                raise
            raise RewardFunctionError(
                f"The reward function {name!r} raised {type(error).__name__}: {error} (on a batch of "
                f"{len(completions)} completions). Fix the function, or return None for the completions it cannot "
                "score: such rows get no reward and leave their group."
            ) from error
        self._stashed_rewards_per_func = rewards_per_func  # gathered over processes, (P * B, n_funcs)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self._group_size(mode)
        rewards_per_func, self._stashed_rewards_per_func = self._stashed_rewards_per_func, None
        device = output["completion_ids"].device
        num_local = output["completion_ids"].size(0)
        # The same reduction TRL applies before computing advantages; a row for which every reward function
        # returned None stays NaN ("no reward") instead of collapsing to 0.
        global_rewards = (rewards_per_func * self.reward_weights.to(device)[None, :]).nansum(dim=1)
        global_rewards = global_rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))
        # A reward of +-inf (or an overflowing weighted sum) cannot be centred or exponentiated: the row has no reward
        # and leaves its group, exactly like a None reward, for both losses. NaN from a function is None already.
        infinite = torch.isinf(global_rewards)
        if bool(infinite.any()):
            functions = [
                name
                for name, column in zip(self.reward_func_names, rewards_per_func.T)
                if bool(torch.isinf(column).any())
            ]
            logger.warning(
                "%d of %d completions got an infinite reward (reward functions with infinite values: %s); they are "
                "treated as having no reward and leave their group.",
                int(infinite.sum()),
                infinite.numel(),
                ", ".join(functions) or "none; the weighted sum overflowed",
            )
            global_rewards = global_rewards.masked_fill(infinite, math.nan)
        local = slice(self.accelerator.process_index * num_local, (self.accelerator.process_index + 1) * num_local)
        output["row_rewards"] = global_rewards[local]
        output["row_group_index"] = torch.arange(global_rewards.numel(), device=device)[local] // group_size
        self._add_group_statistics(output, global_rewards, local, group_size, mode)
        return output

    def _add_group_statistics(
        self, output: dict[str, Any], global_rewards: torch.Tensor, local: slice, group_size: int, mode: str
    ) -> None:
        """Attach per-row tensors computed on whole groups. `global_rewards` is `(P * B,)` in global order."""
        raise NotImplementedError

    def _policy_token_logps(
        self, model, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs and entropies `(B, C)` of the completion tokens under `model` (with gradient), and
        the MoE router's load-balancing loss (0-d, None unless GRPO would add it: `self.aux_loss_enabled`).

        GRPO's own forward (the fused LM head: no `(B, T, V)` logits), with every multimodal input it accepts.
        """
        return self._get_per_token_logps_and_entropies(
            model,
            *prompt_completion_sequences(inputs),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **self._multimodal_inputs(inputs),
        )

    def _add_aux_loss(self, loss: torch.Tensor, aux_loss: torch.Tensor | None, mode: str) -> torch.Tensor:
        """`loss` plus the MoE load-balancing loss exactly as GRPO adds it (`router_aux_loss_coef`, scaled for
        gradient accumulation), logged as `aux_loss`; `loss` unchanged for a dense model."""
        if aux_loss is None:
            return loss
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()).mean().item())
        return loss + self.router_aux_loss_coef * aux_loss / accumulation

    @staticmethod
    def _multimodal_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        """The multimodal inputs of a batch that `_get_per_token_logps_and_entropies` accepts (None if absent)."""
        return {name: batch.get(name) for name in _MULTIMODAL_INPUTS}

    def _token_mean_normalizer(self, inputs: dict[str, Any], mode: str) -> torch.Tensor:
        """Divisor that makes a per-micro-batch token sum the token mean over the generation batch.

        Exactly GRPO's `loss_type="dapo"` normalisation: the global token count of the generation batch, shared
        among processes (DDP averages gradients) and among the micro-steps of an optimizer step.
        """
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-row tensor over processes in global row order (every rank must call this)."""
        return self.accelerator.gather(tensor.contiguous())

    def _log_mean_over_processes(
        self, mode: str, name: str, value_sum: torch.Tensor, count: torch.Tensor, empty: float = float("nan")
    ) -> None:
        """Log `sum / count` of a quantity summed over every process, or `empty` when the count is 0 (every rank
        must call this)."""
        stats = torch.stack([value_sum.detach().float().reshape(()), count.detach().float().reshape(())])
        total, total_count = self.accelerator.reduce(stats, reduction="sum").tolist()
        self._metrics[mode][name].append(total / total_count if total_count > 0 else empty)

    @profiled
    def _prepare_inputs(self, generation_batch):
        if not self.model.training or not self._keeps_groups_whole:
            return super()._prepare_inputs(generation_batch)
        # GRPOTrainer._prepare_inputs's buffering, with whole groups shuffled instead of single rows. Not reused
        # through super(): TRL shuffles single rows inside that method (shuffle_sequence_dict) with no hook to shuffle
        # groups instead, and undoing its shuffle afterwards would mean re-splitting VLM pixel values. A TRL release
        # that changes this buffering fails test_whole_group_buffering_is_trls_with_only_the_shuffle_changed.
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            split_pixel_values_by_grid = trl_private("trl.trainer.utils", "split_pixel_values_by_grid")
            split_tensor_dict = trl_private("trl.trainer.utils", "split_tensor_dict")
            unsplit_pixel_values_by_grid = trl_private("trl.trainer.utils", "unsplit_pixel_values_by_grid")
            batch = self._generate_and_score_completions(generation_batch)
            batch = split_pixel_values_by_grid(batch)
            batch = shuffle_whole_groups(batch, self.num_generations)
            batches = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]
