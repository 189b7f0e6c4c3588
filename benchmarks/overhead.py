"""What GN-IVO and VIMPO cost over GRPO: step time and peak memory on identical inputs, side by side.

Every method gets the same prompts and the same completions (a fixed-output generation stub replaces sampling, so
generation is out of the timing) and is measured on the same model weights:

* ``grpo``, ``grpo+ref``: TRL's own ``GRPOTrainer`` with ``beta=0`` and with ``beta=0.04`` (which adds the reference
  forward at scoring time);
* ``gnivo/token``, ``gnivo/step``, ``gnivo/sequence``: ``GNIVOTrainer`` in each prefix unit;
* ``vimpo/exact``, ``vimpo/k2``, ``vimpo/k3``, ``vimpo/candidate_set``: ``VIMPOTrainer`` with each KL estimator;
  ``vimpo/adaptive``: the exact KL with ``vimpo_adaptive_actor_coeff=True``.

One *step* = scoring (``_generate_and_score_completions`` with the stub: every no-grad forward a method runs per
generation batch, e.g. GRPO's reference forward; VIMPO runs none there) + the loss step (``compute_loss``: forward,
loss, backward; VIMPO's reference forward, KL and advantages are computed here). Both phases are timed separately
and summed. Methods are interleaved inside each repetition (a warm-up
step first), and every figure is the median over repetitions of the ratio to GRPO taken within the same repetition,
because these machines are noisy.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory held before the step. On CPU, the growth of
the process's peak resident set (``/proc/self/clear_refs`` reset, ``VmHWM``) during the step, measured in a separate
pass (a child process, one repetition: memory is deterministic) with glibc's mmap threshold pinned low
(``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors are returned at once and RSS follows the live tensors; the
timing pass runs with glibc's defaults, because the low threshold adds system time to every step.

Scenarios (the no-grad forwards TRL itself runs at scoring time differ between them):

* ``aligned``: one optimizer step per generation batch in one micro-batch, transformers generation (TRL's defaults
  without vLLM): GRPO computes no old log-probs. VIMPO scores at loss time only: the reference's forward, the
  policy's forward and backward, and the exact KL from both models' hidden states (TRL's kernels).
* ``old-logps``: ``num_iterations=2``, so TRL computes the policy's old log-probs at scoring time, the same no-grad
  forward it runs with vLLM's importance-sampling correction (TRL's default with vLLM), for every method alike.

Every configuration runs with gradient checkpointing, turned on in ``build_trainer`` as ``Trainer.train()`` turns it
on (the steps call ``compute_loss`` directly, which alone would run without it).

Configurations:

* ``--device cpu`` (default): a tiny Qwen2-architecture model (hidden 64, 2 layers) with a 32,000-token vocabulary,
  float32, B=2 completions (one group, K=2) after a 128-token prompt.
* ``--device cuda``: Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864), random
  initialisation, vocabulary 151,936, bf16, gradient checkpointing, B=2 after a 128-token prompt; the setting of the
  anchor measurements. Needs a GPU (about 80 GB for T=8192).
* ``--device cpu --shape qwen2-0.5b``: that shape on CPU in float32, where the LM head weighs against the backbone as
  in the real model (the tiny model's step is almost all LM head); 13-36 s per step at T=256-512 on two threads, so
  short lengths only, and about 2 GB per model copy (each method holds its own policy and, with a reference, a
  second copy).

Usage::

    python -m benchmarks.overhead                       # CPU, T in 256..8192, writes results/overhead/overhead.md
    python -m benchmarks.overhead --lengths 256 1024 --repeats 3 --methods grpo gnivo/token \
        --old-logps-methods  # an empty list: the aligned scenario only
    python -m benchmarks.overhead --device cuda         # results/overhead/overhead_gpu.md
    python -m benchmarks.overhead --shape qwen2-0.5b --lengths 256 512 --repeats 3 --threads 2 \
        --methods grpo grpo+ref gnivo/token vimpo/exact --old-logps-methods --kl-memory-tokens 0  # overhead_qwen2-05b.md

(from the repository root, with the project's ``.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import reporting

STUDY = "overhead"
REPO_ROOT = reporting.REPO_ROOT

METHODS = [
    "grpo",
    "grpo+ref",
    "gnivo/token",
    "gnivo/step",
    "gnivo/sequence",
    "vimpo/exact",
    "vimpo/k2",
    "vimpo/k3",
    "vimpo/candidate_set",
    "vimpo/adaptive",
]
OLD_LOGPS_METHODS = ["grpo", "grpo+ref", "gnivo/token", "vimpo/exact", "vimpo/k3"]
SCENARIOS = {"aligned": dict(num_iterations=1), "old-logps": dict(num_iterations=2)}
DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096, 8192]
PROMPT_LENGTH = 128
NUM_COMPLETIONS = 2  # one group of K=2, as in the anchor measurements
STEP_EVERY = 64  # a "\n\n" token every 64 completion tokens, for step units
MODEL_SHAPES = {
    "tiny": dict(
        vocab_size=32_000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen2-0.5b": dict(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
}
DEFAULT_SHAPE = {"cpu": "tiny", "cuda": "qwen2-0.5b"}


def model_shape(device: str, shape_name: str | None = None) -> dict:
    """The Qwen2 shape a run uses: ``shape_name`` (a key of ``MODEL_SHAPES``), else the device's default."""
    return MODEL_SHAPES[shape_name or DEFAULT_SHAPE[device]]


# ----------------------------------------------------------------------------------------------------------------------
# Model, tokenizer and inputs
# ----------------------------------------------------------------------------------------------------------------------


def build_model_dir(directory: Path, device: str, seed: int = 0, shape_name: str | None = None) -> str:
    """A randomly initialised Qwen2 model of the configuration's shape and a word-level tokenizer covering its vocab."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    shape = model_shape(device, shape_name)
    vocab = {"<|pad|>": 0, "<|unk|>": 1, "<|im_end|>": 2, "\n\n": 3}
    vocab.update({f"w{i}": i for i in range(len(vocab), shape["vocab_size"])})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="<|unk|>", padding_side="left"
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        **shape,
        max_position_embeddings=PROMPT_LENGTH + max(DEFAULT_LENGTHS) + 8,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="bfloat16" if device == "cuda" else "float32",
    )
    model = Qwen2ForCausalLM(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, do_sample=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def fixed_completions(
    length: int, vocab_size: int, seed: int = 0, num_completions: int = NUM_COMPLETIONS
) -> list[list[int]]:
    """``num_completions`` random completions of exactly ``length`` tokens, a step delimiter every STEP_EVERY, EOS last."""
    import torch

    generator = torch.Generator().manual_seed(seed + length)
    completions = []
    for _ in range(num_completions):
        ids = torch.randint(4, vocab_size, (length,), generator=generator)
        ids[STEP_EVERY - 1 :: STEP_EVERY] = 3
        ids[-1] = 2
        completions.append(ids.tolist())
    return completions


def build_trainer(
    method: str,
    model_dir: str,
    device: str,
    length: int,
    output_dir: str,
    scenario: str = "aligned",
    shape_name: str | None = None,
    num_completions: int = NUM_COMPLETIONS,
    model_dtype: str | None = None,
):
    """A trainer of ``method`` whose generation returns fixed completions of ``length`` tokens, and its input rows.

    ``num_completions`` completions form one group (``num_generations``) in one micro-batch (benchmarks/gpu_check.py
    measures B = 2 and 8). ``model_dtype`` (e.g. ``"bfloat16"``) is the dtype TRL loads the policy and reference in;
    None means bfloat16 on CUDA (the anchor's setting) and TRL's default elsewhere, which is float32 whatever dtype
    the checkpoint was saved in.
    """
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from gnivo_trl import GNIVOConfig, GNIVOTrainer, VIMPOConfig, VIMPOTrainer

    common = dict(
        output_dir=output_dir,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        gradient_checkpointing=True,
        num_generations=num_completions,
        per_device_train_batch_size=num_completions,
        max_completion_length=length,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        **SCENARIOS[scenario],
    )
    if model_dtype is None and device == "cuda":
        model_dtype = "bfloat16"  # TRL would load the bf16 checkpoint in float32
    if model_dtype is not None:
        common["model_init_kwargs"] = {"dtype": model_dtype}
    family, _, variant = method.partition("/")
    if family.startswith("grpo"):
        config_cls, trainer_cls = GRPOConfig, GRPOTrainer
        common["beta"] = 0.04 if method == "grpo+ref" else 0.0
    elif family == "gnivo":
        config_cls, trainer_cls = GNIVOConfig, GNIVOTrainer
        common["gnivo_prefix_unit"] = variant
    elif variant == "adaptive":  # the exact KL with the adaptive actor weight (its logit-gradient RMS each step)
        config_cls, trainer_cls = VIMPOConfig, VIMPOTrainer
        common.update(vimpo_kl_estimator="exact", vimpo_adaptive_actor_coeff=True)
    else:
        config_cls, trainer_cls = VIMPOConfig, VIMPOTrainer
        common["vimpo_kl_estimator"] = variant
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)  # AutoTokenizer would pick Qwen2's BPE class
    prompt = " ".join(f"w{4 + i}" for i in range(PROMPT_LENGTH))
    dataset = Dataset.from_dict({"prompt": [prompt] * max(4, num_completions)})
    vocab_size = model_shape(device, shape_name)["vocab_size"]
    completions = fixed_completions(length, vocab_size, num_completions=num_completions)

    def reward(completions, **kwargs):
        return [float(i % 2) for i in range(len(completions))]  # distinct rewards within the group

    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=reward,
        args=config_cls(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
    )

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return [list(completions[i % num_completions]) for i in range(len(prompt_ids))], None

    trainer._generate_single_turn = generate
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loss is called directly here
    enable_gradient_checkpointing(trainer)  # idem
    if device == "cuda":
        trainer.model.to("cuda")
    return trainer, [dict(row) for row in dataset.select(range(num_completions))]


def enable_gradient_checkpointing(trainer) -> None:
    """Turn on the policy's gradient checkpointing as ``Trainer.train()`` does before its first step when the config
    asks for it (``gradient_checkpointing``, or transformers 5's ``activation_checkpointing``): the measured steps
    call ``compute_loss`` directly, which would otherwise run without it."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(args, "activation_checkpointing", None):  # transformers >= 5: gradient_checkpointing is its alias
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
        )
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


class PeakMemory:
    """Peak memory above the level at entry, in MiB (CUDA allocator, or the CPU process's resident set)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        self.mib = (peak - self.start) / 2**20
        if self.device != "cuda":
            # The kernel updates the resident high-water mark lazily; pages reclaimed meanwhile (e.g. by DAMON) can
            # leave it below the level at entry. No measured growth is 0, not a negative peak (seen in CI: -0.36x).
            self.mib = max(self.mib, 0.0)


def one_step(trainer, rows: list[dict], device: str) -> dict[str, float]:
    """Scoring + loss step of one generation batch; returns seconds of each phase and the peak memory in MiB."""
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    trainer.model.zero_grad(set_to_none=True)
    with PeakMemory(device) as memory:
        with PeakMemory(device) as scoring_memory:
            sync()
            start = time.perf_counter()
            batch = trainer._generate_and_score_completions(rows)
            sync()
            scored = time.perf_counter()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        sync()
        done = time.perf_counter()
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    trainer.model.zero_grad(set_to_none=True)
    del batch, loss
    return {
        "score_s": scored - start,
        "loss_s": done - scored,
        "step_s": done - start,
        "peak_mib": memory.mib,
        "scoring_peak_mib": scoring_memory.mib,
    }


def run(
    device: str,
    lengths: list[int],
    methods: list[str],
    repeats: int,
    workdir: Path,
    scenario: str,
    shape_name: str | None = None,
) -> dict:
    import torch

    torch.manual_seed(0)
    model_dir = build_model_dir(workdir / "model", device, shape_name=shape_name)
    results: dict[tuple[int, str], list[dict]] = {}
    for length in lengths:
        trainers = {}
        for method in methods:
            trainers[method] = build_trainer(
                method, model_dir, device, length, str(workdir / "out"), scenario, shape_name
            )
            one_step(*trainers[method], device)  # warm-up (kernels, allocator, token-text caches)
        for repeat in range(repeats):
            order = methods if repeat % 2 == 0 else list(reversed(methods))  # interleave, alternate the order
            for method in order:
                results.setdefault((length, method), []).append(one_step(*trainers[method], device))
        for method in methods:
            figures = results[(length, method)]
            print(
                f"{scenario:9s} T={length:5d} {method:15s} step {statistics.median(f['step_s'] for f in figures):8.4f} s  "
                f"peak {statistics.median(f['peak_mib'] for f in figures):9.1f} MiB",
                flush=True,
            )
        del trainers
        gc.collect()
    return results


def median_ratio(results, length: int, method: str, baseline: str, key: str) -> float:
    pairs = zip(results[(length, method)], results[(length, baseline)], strict=True)
    return statistics.median(a[key] / b[key] if b[key] > 0 else float("nan") for a, b in pairs)


def machine_description(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"CPU: {cpu}, {os.cpu_count()} logical cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


SCENARIO_TITLES = {
    "aligned": "Scenario `aligned`: one optimizer step per generation batch, no old log-probs (transformers generation)",
    "old-logps": (
        "Scenario `old-logps`: num_iterations=2, TRL computes old log-probs at scoring time (the forwards it runs "
        "with vLLM's importance-sampling correction)"
    ),
}


KL_MEMORY_TITLE = "## VIMPO's exact KL against a naive full-vocabulary implementation"


def kl_memory_section(tokens: int, device: str, command: str, shape_name: str | None = None) -> list[str]:
    """Peak memory of VIMPO's chunked exact KL vs the naive one at ``tokens`` tokens (benchmarks/vimpo_kl_memory.py).

    Both run on CPU in fresh processes with the configuration's vocabulary and hidden size; see that script.
    """
    from benchmarks import vimpo_kl_memory

    shape = model_shape(device, shape_name)
    vocab, hidden = shape["vocab_size"], shape["hidden_size"]
    naive = vimpo_kl_memory.measure("naive", tokens, vocab=vocab, hidden=hidden)
    chunked = vimpo_kl_memory.measure("chunked", tokens, vocab=vocab, hidden=hidden)
    difference = vimpo_kl_memory.max_abs_difference(chunked, naive)
    one_tensor = tokens * vocab * 4 / 2**20
    return [
        "",
        f"{KL_MEMORY_TITLE} (T={tokens})",
        "",
        f"Command: `{command}`. Peak resident-set growth of a fresh CPU process per variant "
        f"(`benchmarks/vimpo_kl_memory.py`: float32 heads of the configuration's shape, V={vocab:,}, H={hidden}, "
        f"{tokens} tokens, glibc mmap threshold pinned low). The naive variant holds both models' (N, V) logits, their "
        "float32 log-softmaxes and the difference, as the VIMPO port of the anchor measurements does; VIMPO "
        f"(TRL's divergence kernel on chunks of `vimpo_kl_chunk_size` = {chunked.chunk_size} tokens) holds two "
        f"(chunk, 32768) float32 tiles. One (N, V) float32 tensor is {one_tensor:,.0f} MiB.",
        "",
        "| variant | peak MiB | ratio to naive | max abs difference of the KL |",
        "|---|---|---|---|",
        f"| naive | {naive.peak_mib:,.0f} | 1.000 | - |",
        f"| VIMPO chunked | {chunked.peak_mib:,.0f} | {chunked.peak_mib / naive.peak_mib:.3f} | {difference:.1e} |",
        "",
        reporting.provenance_line(),
    ]


def replace_kl_memory_section(output: Path, section: list[str]) -> str:
    """Put ``section`` in place of the report's KL-memory section (appended if it has none)."""
    report = output.read_text() if output.exists() else ""
    if KL_MEMORY_TITLE in report:
        report = report[: report.index(KL_MEMORY_TITLE)].rstrip("\n") + "\n"
    report = report + "\n".join(section[1:] if not report else section) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    return report


def write_report(
    sections, device: str, lengths, repeats: int, output: Path, command: str, shape_name: str | None = None
) -> str:
    """``sections``: ``[(scenario, methods, results)]``; one group of tables per scenario."""
    lines = [
        f"# Overhead over GRPO: step time and peak memory ({device.upper()})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_description(device)}",
        "",
        f"Model: Qwen2 architecture, random initialisation, {model_shape(device, shape_name)}, "
        f"{'bf16' if device == 'cuda' else 'float32'}, gradient checkpointing on. Inputs: {NUM_COMPLETIONS} completions "
        f"(one group) of exactly T tokens after a {PROMPT_LENGTH}-token prompt, the same fixed tokens for every method "
        f"(generation stubbed out), a step delimiter every {STEP_EVERY} tokens. One step = scoring (the no-grad "
        "forwards of `_generate_and_score_completions`: old log-probs where TRL computes them, GRPO+ref's reference "
        "forward; VIMPO runs none of its own) + loss step (forward, loss, backward; VIMPO's reference forward, exact "
        "KL on TRL's kernels and advantages are computed here). Each figure is "
        f"the median over {repeats} repetitions of the ratio to the baseline measured in the same repetition (methods "
        "interleaved).",
    ]

    def table(title: str, methods, cell) -> None:
        """A Markdown table with a row per method and a column per length; ``cell(length, method) -> str``."""
        lines.extend(["", f"### {title}", "", "| method | " + " | ".join(f"T={t}" for t in lengths) + " |"])
        lines.append("|---|" + "---|" * len(lengths))
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(cell(length, method) for length in lengths) + " |")

    for scenario, methods, results in sections:

        def ratios(key: str, results=results):
            def cell(length: int, method: str) -> str:
                to_grpo = median_ratio(results, length, method, "grpo", key)
                return f"{to_grpo:.3f} / {median_ratio(results, length, method, 'grpo+ref', key):.3f}"

            return cell

        def median(length: int, method: str, key: str, results=results) -> float:
            return statistics.median(f[key] for f in results[(length, method)])

        def absolute(length: int, method: str) -> str:
            step, score = median(length, method, "step_s"), median(length, method, "score_s")
            return f"{step:.3f} s ({score:.3f} + {step - score:.3f}), {median(length, method, 'peak_mib'):.0f} MiB"

        lines.extend(["", f"## {SCENARIO_TITLES[scenario]}"])
        table(
            "Step time, ratio to GRPO (beta=0) / to GRPO with a reference model (beta=0.04)", methods, ratios("step_s")
        )
        table(
            "Peak memory above the resident model, ratio to GRPO / to GRPO with a reference model",
            methods,
            ratios("peak_mib"),
        )
        table(
            "Peak memory of the scoring phase alone (MiB above the resident model)",
            methods,
            lambda length, method: f"{median(length, method, 'scoring_peak_mib'):.0f}",
        )
        table("Absolute figures (medians): step seconds (scoring + loss step), peak MiB", methods, absolute)
    report = reporting.with_provenance("\n".join(lines) + "\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    return report


def _memory_in_subprocess(args: argparse.Namespace, scenario: str, methods: list[str]) -> dict:
    """Run the memory pass in a child process with glibc's mmap threshold pinned low (see the module docstring)."""
    import json
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "benchmarks.overhead", "--device", "cpu", "--repeats", "1"]
        command += ["--memory-pass", out.name]
        command += ["--scenario", scenario, "--lengths", *map(str, args.lengths), "--methods", *methods]
        command += ["--threads", str(args.threads)] + (["--shape", args.shape] if args.shape else [])
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        subprocess.run(command, env=env, check=True, cwd=REPO_ROOT)
        raw = json.loads(Path(out.name).read_text())
    return {(int(length), method): figures for length, method, figures in raw}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--shape",
        choices=list(MODEL_SHAPES),
        default=None,
        help="model shape (default: tiny on cpu, qwen2-0.5b on cuda); qwen2-0.5b on cpu runs in float32",
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    parser.add_argument(
        "--methods", nargs="+", default=METHODS, choices=METHODS, help="methods of the aligned scenario"
    )
    parser.add_argument(
        "--old-logps-methods",
        nargs="*",
        default=OLD_LOGPS_METHODS,
        choices=METHODS,
        help="methods of the old-logps scenario (none: skip it)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier timings on a shared 2-core machine)"
    )
    parser.add_argument(
        "--kl-memory-tokens",
        type=int,
        default=4096,
        help="tokens of the exact-KL vs naive memory comparison appended to the report (0: skip)",
    )
    parser.add_argument(
        "--kl-memory-only",
        action="store_true",
        help="only (re)measure the exact-KL vs naive section and replace it in the existing report",
    )
    parser.add_argument("--memory-pass", default=None, help=argparse.SUPPRESS)  # internal: child process of a CPU run
    parser.add_argument("--scenario", default="aligned", choices=list(SCENARIOS), help=argparse.SUPPRESS)  # idem
    args = parser.parse_args(argv)
    plan = [("aligned", args.methods)] + ([("old-logps", args.old_logps_methods)] if args.old_logps_methods else [])
    for scenario, methods in plan:
        if "grpo" not in methods or "grpo+ref" not in methods:
            parser.error(f"the {scenario} scenario's methods must include the baselines grpo and grpo+ref")
    if args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads)
    if args.memory_pass:
        import json

        with tempfile.TemporaryDirectory() as workdir:
            results = run(args.device, args.lengths, args.methods, 1, Path(workdir), args.scenario, args.shape)
        Path(args.memory_pass).write_text(json.dumps([[t, m, f] for (t, m), f in results.items()]))
        return 0

    name = "overhead" + ("_gpu" if args.device == "cuda" else "")
    if args.shape and args.shape != DEFAULT_SHAPE[args.device]:
        name += "_" + args.shape.replace(".", "")
    output = args.output or reporting.results_dir(STUDY) / f"{name}.md"
    command = "python -m benchmarks.overhead " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.kl_memory_only:
        section = kl_memory_section(args.kl_memory_tokens, args.device, command, args.shape)
        print(replace_kl_memory_section(output, section))
        return 0
    sections = []
    for scenario, methods in plan:
        # Timing pass in this process (glibc defaults: a low mmap threshold would add system time to every step).
        with tempfile.TemporaryDirectory() as workdir:
            results = run(args.device, args.lengths, methods, args.repeats, Path(workdir), scenario, args.shape)
        if args.device == "cpu":
            memory = _memory_in_subprocess(args, scenario, methods)
            for key, figures in results.items():
                for figure in figures:
                    figure["peak_mib"] = memory[key][0]["peak_mib"]
                    figure["scoring_peak_mib"] = memory[key][0]["scoring_peak_mib"]
        sections.append((scenario, methods, results))
    report = write_report(sections, args.device, args.lengths, args.repeats, output, command.strip(), args.shape)
    if args.kl_memory_tokens:
        section = kl_memory_section(args.kl_memory_tokens, args.device, command.strip(), args.shape)
        report = replace_kl_memory_section(output, section)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
