"""examples/train_math.py end to end on CPU, every recipe through the script's parser, the accelerate configs, and
the VIMPO model card."""

from __future__ import annotations  # noqa: I001

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "examples" / "accelerate_configs").glob("*.yaml"))
CITATION_KEYS = {"gnivo": "Group-Normalized Implicit Value Optimization", "vimpo": "kang2026vimpo", "grpo": "shao2024"}


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


train_math = load_example("train_math")


def test_recipes_exist():
    names = {path.name for path in RECIPES}
    for expected in (
        "test_tiny.yaml",
        "gnivo_qwen2.5-math-7b_lora.yaml",
        "gnivo_llama-3.1-8b-instruct_lora.yaml",
        "vimpo_qwen3-4b-base.yaml",
        "grpo_qwen3-4b-base.yaml",
    ):
        assert expected in names
    for algorithm in train_math.ALGORITHMS:
        assert any(name.startswith(algorithm) and "single_gpu" in name for name in names), algorithm


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_keys_are_real_fields(recipe):
    """Every key names a field of the script arguments, the algorithm's config or ModelConfig, and the whole recipe
    parses through the script's own parser (TrlParser refuses unknown keys)."""
    from trl import ModelConfig

    raw = yaml.safe_load(recipe.read_text())
    algorithm = raw["algorithm"]
    config_cls, _ = train_math.algorithm_classes(algorithm)
    known = {
        f.name for cls in (train_math.MathScriptArguments, config_cls, ModelConfig) for f in dataclasses.fields(cls)
    }
    assert set(raw) - known == set()

    # use_cpu: the GPU recipes ask for bf16, which GRPOConfig refuses on a machine without an accelerator.
    script_args, training_args, model_args = train_math.parse_args(["--config", str(recipe), "--use_cpu", "true"])
    assert type(training_args) is config_cls and script_args.algorithm == algorithm
    for key, value in raw.items():
        target = next(obj for obj in (script_args, training_args, model_args) if hasattr(obj, key))
        assert getattr(target, key) == value or key in {"dtype", "report_to", "lr_scheduler_type"}, key
    if recipe.name != "test_tiny.yaml":
        assert model_args.model_name_or_path and training_args.output_dir.startswith("outputs/")
    train_math.resolve_reward_funcs(script_args.reward_funcs)


def _launch_config(recipe: Path) -> dict | None:
    """The accelerate config a recipe's header says to launch it with (None: plain ``python``, one process)."""
    configs = re.findall(r"--config_file (examples/accelerate_configs/\S+\.yaml)", recipe.read_text())
    assert len(set(configs)) <= 1, configs
    return yaml.safe_load((ROOT / configs[0]).read_text()) if configs else None


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_precision_keeps_float32_master_weights(recipe):
    """Full fine-tuning must update float32 weights: bf16 weights without ZeRO take AdamW's updates in bf16, which
    rounds most of them away at the recipes' rates (measured: 1.9% of the weights changed after 10 steps at 1e-6
    against 10% with float32 weights). Safe: float32 weights (under bf16 autocast or not); LoRA (the adapter holds
    the trained weights, in float32); DeepSpeed ZeRO with bf16 (it keeps a float32 master copy)."""
    raw = yaml.safe_load(recipe.read_text())
    launch = _launch_config(recipe)
    if recipe.name != "test_tiny.yaml":
        assert launch is not None, "a GPU recipe names the accelerate config it runs with"
    dtype = raw.get("dtype", "float32")  # TRL loads float32 when no dtype is given
    lora = raw.get("use_peft", False)
    zero = launch is not None and launch["distributed_type"] == "DEEPSPEED" and raw.get("bf16", False)
    assert dtype == "float32" or lora or zero, (dtype, lora, launch and launch["distributed_type"])
    if dtype != "float32" and not lora:
        assert launch["mixed_precision"] == "bf16" and raw["bf16"] is True


def test_paper_numbers_in_recipes():
    """The numbers the papers report, as the recipes must carry them."""
    vimpo = yaml.safe_load((ROOT / "examples/recipes/vimpo_qwen3-4b-base.yaml").read_text())
    grpo = yaml.safe_load((ROOT / "examples/recipes/grpo_qwen3-4b-base.yaml").read_text())
    assert vimpo["model_name_or_path"] == "Qwen/Qwen3-4B-Base" and vimpo["dataset_name"] == "guru_math"
    assert (vimpo["num_generations"], vimpo["vimpo_beta"], vimpo["vimpo_actor_coeff"]) == (8, 5e-4, 5e-3)
    assert (vimpo["learning_rate"], vimpo["warmup_steps"], vimpo["weight_decay"]) == (1e-6, 10, 0.1)
    assert (vimpo["epsilon"], vimpo["epsilon_high"], vimpo["max_grad_norm"]) == (0.2, 0.28, 1.0)
    assert vimpo["max_completion_length"] == 4096
    # 96 prompts x 8 completions per optimizer step on the 8 GPUs of the accelerate configs
    assert vimpo["per_device_train_batch_size"] * 8 * vimpo["gradient_accumulation_steps"] == 96 * 8
    shared = {k: v for k, v in vimpo.items() if not k.startswith("vimpo_") and k not in {"algorithm", "output_dir"}}
    assert {k: grpo[k] for k in shared} == shared
    for name, model in [
        ("gnivo_qwen2.5-math-7b_lora.yaml", "Qwen/Qwen2.5-Math-7B"),
        ("gnivo_llama-3.1-8b-instruct_lora.yaml", "meta-llama/Llama-3.1-8B-Instruct"),
    ]:
        gnivo = yaml.safe_load((ROOT / "examples/recipes" / name).read_text())
        assert gnivo["model_name_or_path"] == model and gnivo["use_peft"] is True
        assert (gnivo["num_generations"], gnivo["gnivo_alpha"], gnivo["dataset_name"]) == (4, 0.2, "math")


def test_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("algorithm: grpo\noutput_dir: x\nuse_cpu: true\ngnivo_alpha: 0.2\n")  # not a GRPOConfig field
    with pytest.raises(ValueError, match="gnivo_alpha"):
        train_math.parse_args(["--config", str(recipe)])
    with pytest.raises(ValueError, match="algorithm"):
        train_math.parse_args(["--algorithm", "ppo", "--output_dir", "x"])


def test_command_line_algorithm_overrides_recipe():
    script_args, training_args, _ = train_math.parse_args(
        ["--config", str(ROOT / "examples/recipes/test_tiny.yaml"), "--algorithm", "vimpo", "--output_dir", "x"]
    )
    assert script_args.algorithm == "vimpo" and type(training_args).__name__ == "VIMPOConfig"


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every command line of the README's and the docs pages' ``bash`` blocks that runs examples/train_math.py, as
    ``(page, words)`` (continuation lines joined, comments dropped)."""
    import shlex

    commands = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                if "examples/train_math.py" in line:
                    commands.append((page.name, shlex.split(line.split(" #")[0])))
    return commands


def test_every_documented_train_math_command_parses():
    """A command a page gives (a recipe, launch options, overrides such as vLLM's server mode) names files that exist
    and options the script's parser accepts."""
    commands = documented_commands()
    assert len(commands) >= 6
    for page, words in commands:
        script = words.index("examples/train_math.py")
        for option, value in zip(words[:script], words[1 : script + 1]):
            if option == "--config_file":
                assert (ROOT / value).is_file(), (page, value)
        arguments = words[script + 1 :]
        try:
            train_math.parse_args([*arguments, "--use_cpu", "true"])
        except (SystemExit, ValueError) as error:
            raise AssertionError(f"{page}: `{' '.join(words)}` does not parse: {error}") from error


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    expected = {
        "single_gpu.yaml": ("NO", None),
        "ddp.yaml": ("MULTI_GPU", None),
        "zero2.yaml": ("DEEPSPEED", 2),
        "zero3.yaml": ("DEEPSPEED", 3),
    }[config.name]
    assert loaded.distributed_type.value == expected[0]
    assert (loaded.deepspeed_config or {}).get("zero_stage") == expected[1]
    assert loaded.mixed_precision == "bf16"


def test_all_accelerate_configs_present():
    assert {path.name for path in ACCELERATE_CONFIGS} >= {"single_gpu.yaml", "ddp.yaml", "zero2.yaml", "zero3.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["gnivo", "vimpo", "grpo"])
def test_train_math_two_steps_on_cpu(algorithm, tiny_model_dir, tmp_path):
    output_dir = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "examples" / "train_math.py"),
        "--config",
        str(ROOT / "examples" / "recipes" / "test_tiny.yaml"),
        "--algorithm",
        algorithm,
        "--dataset_path",
        str(ROOT / "tests" / "fixtures" / "datasets" / "math_train.jsonl"),
        "--model_name_or_path",
        tiny_model_dir,
        "--output_dir",
        str(output_dir),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(HF_HUB_DISABLE_TELEMETRY="1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    assert "'train_runtime'" in result.stdout + result.stderr
    assert "'epoch': '1'" in result.stdout + result.stderr  # 2 steps of 2 prompts over the 4 fixture problems
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "config.json").is_file()
    assert (output_dir / "tokenizer.json").is_file()
    card = (output_dir / "README.md").read_text()
    assert f"- {algorithm}\n" in card  # the algorithm's tag
    assert "datasets: math" in card  # a local file in MATH's layout is named by its source
    assert CITATION_KEYS[algorithm] in card
    assert "# Model Card for out" in card
    own_metric = {"gnivo": "'gnivo/", "vimpo": "'vimpo/value_loss'", "grpo": "'clip_ratio/"}[algorithm]
    assert own_metric in result.stdout + result.stderr  # the algorithm's own loss ran


def test_vimpo_model_card_names_base_model_dataset_algorithm_and_paper(tiny_model_dir, tmp_path):
    from trainer_harness import build_trainer

    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path))
    # TRL names the base model only when it is a Hub id, not a local directory: give the tiny model one.
    trainer.model.config._name_or_path = "Qwen/Qwen3-4B-Base"
    trainer.create_model_card(model_name="vimpo-tiny", dataset_name="LLM360/guru-RL-92k")
    card = (tmp_path / "README.md").read_text()
    assert "base_model: Qwen/Qwen3-4B-Base" in card
    assert "datasets: LLM360/guru-RL-92k" in card
    assert "- vimpo\n" in card and "trained with VIMPO" in card
    assert "VIMPO: Value-Implicit Policy Optimization for LLMs" in card
    assert "@article{kang2026vimpo," in card and "arXiv:2606.20008" in card
