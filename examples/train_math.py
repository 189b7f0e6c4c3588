"""Train a language model on verifiable maths problems with GN-IVO, VIMPO or TRL's GRPO (the baseline).

One script for the three algorithms, in the style of TRL's ``trl/scripts/grpo.py`` and open-r1's ``grpo.py``:
arguments are dataclasses parsed by :class:`trl.TrlParser`, so every field can come from a YAML recipe
(``--config``), from the command line (which overrides the recipe), or both. The dataclasses are

* :class:`MathScriptArguments` (this file): the algorithm, datasets and reward functions;
* the algorithm's config: :class:`gnivo_trl.GNIVOConfig`, :class:`gnivo_trl.VIMPOConfig` or :class:`trl.GRPOConfig`
  (every ``TrainingArguments`` / ``GRPOConfig`` field: batch sizes, learning rate, vLLM, DeepSpeed, Hub push, ...);
* :class:`trl.ModelConfig`: the model id or local directory, dtype, attention implementation and LoRA
  (``use_peft: true`` plus ``lora_*``), quantisation.

Because the parser needs one config class, ``--algorithm`` is read first (command line, else the recipe's
``algorithm:`` key, else ``gnivo``) and selects it; unknown keys in a recipe are an error.

Examples::

    # one GPU, LoRA on a small model
    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml examples/train_math.py \\
        --config examples/recipes/gnivo_qwen2.5-math-1.5b_single_gpu.yaml

    # 8 GPUs, DeepSpeed ZeRO-3, vLLM colocated
    accelerate launch --config_file examples/accelerate_configs/zero3.yaml examples/train_math.py \\
        --config examples/recipes/vimpo_qwen3-4b-base.yaml

    # anything in a recipe can be overridden on the command line
    python examples/train_math.py --config examples/recipes/test_tiny.yaml --algorithm vimpo \\
        --model_name_or_path path/to/model --output_dir out

At the end the model is saved to ``output_dir``; with ``push_to_hub: true`` it is pushed with its model card,
otherwise the model card (``README.md``: algorithm tag, dataset, paper citation) is written next to it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("train_math")

ALGORITHMS = ("gnivo", "vimpo", "grpo")
REWARD_FUNCS = ("accuracy", "format")


@dataclass
class MathScriptArguments:
    """Arguments of ``train_math.py`` that are neither training nor model arguments.

    Args:
        algorithm: ``gnivo`` (GNIVOTrainer), ``vimpo`` (VIMPOTrainer) or ``grpo`` (TRL's GRPOTrainer, the baseline).
        dataset_name: Training source, a key of :data:`gnivo_trl.data.DATASETS` (``math``, ``gsm8k``,
            ``guru_math``, ...).
        dataset_path: A local ``.jsonl`` / ``.json`` / ``.parquet`` file in that source's layout, or a Hub dataset
            id; defaults to the source's Hub id.
        dataset_split: Hub split; defaults to the source's usual training split.
        eval_dataset_name: Optional evaluation source (a key of ``DATASETS``), used when ``eval_strategy`` is not
            ``"no"``.
        eval_dataset_path: Local file or Hub id for the evaluation source.
        eval_dataset_split: Hub split of the evaluation source.
        max_train_samples: Keep only the first N training problems (after shuffling with ``seed``), for quick runs.
        max_eval_samples: Keep only the first N evaluation problems.
        system_prompt: Optional system message put before every question.
        reward_funcs: Reward functions: ``accuracy`` (:func:`gnivo_trl.rewards.math_accuracy_reward`), ``format``
            (:func:`gnivo_trl.rewards.format_reward`), or dotted import paths ``package.module.function``. Weight
            them with the config's ``reward_weights``.
        dataset_num_proc: Processes used to format the datasets.
    """

    algorithm: str = field(
        default="gnivo",
        metadata={"help": "gnivo, vimpo, or grpo (TRL's GRPOTrainer baseline).", "choices": list(ALGORITHMS)},
    )
    dataset_name: str = field(
        default="math",
        metadata={"help": "Training source: a key of gnivo_trl.data.DATASETS (math, gsm8k, guru_math, ...)."},
    )
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Local .jsonl/.json/.parquet file in the source's layout, or a Hub dataset id."},
    )
    dataset_split: str | None = field(default=None, metadata={"help": "Hub split (default: the source's own)."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Optional evaluation source, a key of gnivo_trl.data.DATASETS."}
    )
    eval_dataset_path: str | None = field(
        default=None, metadata={"help": "Local file or Hub id of the evaluation source."}
    )
    eval_dataset_split: str | None = field(default=None, metadata={"help": "Hub split of the evaluation source."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only N training problems (shuffled with the seed first)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only N evaluation problems."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={
            "help": "Reward functions: 'accuracy', 'format', or dotted import paths (package.module.function). "
            "Weight them with reward_weights."
        },
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes used to format the datasets."})


def algorithm_classes(algorithm: str) -> tuple[type, type]:
    """The ``(ConfigClass, TrainerClass)`` pair of an algorithm name."""
    if algorithm == "gnivo":
        from gnivo_trl import GNIVOConfig, GNIVOTrainer

        return GNIVOConfig, GNIVOTrainer
    if algorithm == "vimpo":
        from gnivo_trl import VIMPOConfig, VIMPOTrainer

        return VIMPOConfig, VIMPOTrainer
    if algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    raise ValueError(f"algorithm={algorithm!r} is not supported: choose one of {', '.join(ALGORITHMS)}.")


def select_algorithm(argv: Sequence[str]) -> str:
    """The algorithm named by ``--algorithm`` on the command line, else by the recipe's ``algorithm:`` key,
    else ``gnivo``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--algorithm", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(list(argv))
    algorithm = known.algorithm
    if algorithm is None and known.config is not None:
        with open(known.config) as handle:
            recipe = yaml.safe_load(handle)
        if isinstance(recipe, dict):
            algorithm = recipe.get("algorithm")
    algorithm = algorithm or "gnivo"
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is not supported: choose one of {', '.join(ALGORITHMS)}.")
    return algorithm


def make_parser(algorithm: str):
    """The :class:`trl.TrlParser` over ``(MathScriptArguments, <algorithm's config>, ModelConfig)``."""
    from trl import ModelConfig, TrlParser

    config_cls, _ = algorithm_classes(algorithm)
    return TrlParser((MathScriptArguments, config_cls, ModelConfig))


def parse_args(argv: Sequence[str] | None = None) -> tuple[MathScriptArguments, Any, Any]:
    """Parse the command line (and the ``--config`` recipe) into script, training and model arguments.

    Raises:
        ValueError: An unknown key in the recipe, or an unknown algorithm.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    algorithm = select_algorithm(argv)
    script_args, training_args, model_args = make_parser(algorithm).parse_args_and_config(argv)
    if script_args.algorithm != algorithm:  # cannot happen through select_algorithm; kept as a guard
        raise ValueError(f"algorithm mismatch: {script_args.algorithm!r} vs {algorithm!r}")
    return script_args, training_args, model_args


def resolve_reward_funcs(names: Sequence[str]) -> list[Callable]:
    """Turn reward names (``accuracy``, ``format`` or dotted import paths) into callables."""
    from gnivo_trl.rewards import format_reward, math_accuracy_reward

    registry: dict[str, Callable] = {"accuracy": math_accuracy_reward, "format": format_reward}
    funcs = []
    for name in names:
        if name in registry:
            funcs.append(registry[name])
        elif "." in name:
            module_name, attribute = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            funcs.append(getattr(importlib.import_module(module_name), attribute))
        else:
            raise ValueError(
                f"reward_funcs: unknown reward {name!r}; use one of {', '.join(REWARD_FUNCS)} or a dotted import "
                "path such as my_package.rewards.my_reward."
            )
    if not funcs:
        raise ValueError("reward_funcs is empty: give at least one reward function, e.g. reward_funcs: [accuracy].")
    return funcs


def card_dataset_name(name: str, path: str | None) -> str:
    """The dataset named in the model card: the Hub id when the data came from the Hub, else the source's name."""
    from gnivo_trl.data import DATASETS

    if path is None:
        return DATASETS[name].hub_id if name in DATASETS else name
    if Path(path).exists():
        return name  # a local copy in the source's layout
    return path


def load_datasets(script_args: MathScriptArguments, seed: int) -> tuple[Any, Any]:
    """The training dataset and the optional evaluation dataset, with ``prompt`` / ``solution`` columns."""
    from gnivo_trl.data import load_math_dataset

    train = load_math_dataset(
        script_args.dataset_name,
        script_args.dataset_path,
        split=script_args.dataset_split,
        system_prompt=script_args.system_prompt,
        num_proc=script_args.dataset_num_proc,
    )
    if script_args.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(script_args.max_train_samples, len(train))))
    evaluation = None
    if script_args.eval_dataset_name is not None:
        evaluation = load_math_dataset(
            script_args.eval_dataset_name,
            script_args.eval_dataset_path,
            split=script_args.eval_dataset_split,
            system_prompt=script_args.system_prompt,
            num_proc=script_args.dataset_num_proc,
        )
        if script_args.max_eval_samples is not None:
            evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def main(script_args: MathScriptArguments, training_args: Any, model_args: Any) -> Any:
    """Build the trainer for ``script_args.algorithm``, train, save, and push or write the model card.

    Returns the trainer (handy in notebooks and tests).
    """
    import transformers
    from packaging.version import Version
    from trl import get_peft_config, get_quantization_config

    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path is required: a Hub model id or a local directory.")
    _, trainer_cls = algorithm_classes(script_args.algorithm)

    # How TRL's trainers load a model given by name: these kwargs go to from_pretrained.
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}

    train_dataset, eval_dataset = load_datasets(script_args, training_args.seed)
    if eval_dataset is not None and training_args.eval_strategy == "no":
        logger.warning("eval_dataset_name is set but eval_strategy is 'no': the evaluation set will not be used.")

    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        reward_funcs=resolve_reward_funcs(script_args.reward_funcs),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print(f"Training done ({script_args.algorithm}).")

    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    dataset_name = card_dataset_name(script_args.dataset_name, script_args.dataset_path)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)  # writes the model card too
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")
    else:
        model_name = (training_args.hub_model_id or Path(training_args.output_dir).name).split("/")[-1]
        trainer.create_model_card(model_name=model_name, dataset_name=dataset_name)

    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()  # finish the trackers and destroy the process group
    return trainer


if __name__ == "__main__":
    main(*parse_args())
