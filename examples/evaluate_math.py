"""Evaluate a model on maths benchmarks: sample k completions per problem, grade them, report pass@1, pass@k, avg@k.

Benchmarks are names of :data:`gnivo_trl.data.DATASETS` (``math500``, ``aime24``, ``aime25``, ``amc23``, ``minerva``,
``olympiadbench``, ...), loaded from the Hub, or ``name=path`` to read a local ``.jsonl`` / ``.json`` / ``.parquet``
file in that source's layout. Prompts are the training prompts (question + "Please reason step by step, and put your
final answer within \\boxed{}."), rendered with the model's chat template. Generation uses vLLM when it is
importable (``--backend auto``) and batched ``transformers`` ``generate`` otherwise; answers are graded with
:func:`gnivo_trl.rewards.math_accuracy_reward`.

Metrics per benchmark (:mod:`gnivo_trl.evaluation`): ``avg@k`` (mean accuracy over the k samples, which is also the
unbiased pass@1 estimate) and the unbiased ``pass@j`` estimator 1 - C(k-c, j)/C(k, j) for each ``j`` in
``--pass_at`` (default: 1 and k). Problems whose gold answer cannot be parsed are excluded and counted.

Writes ``<output_dir>/results.json`` and ``<output_dir>/results.md`` (a Markdown table), and with
``--save_completions`` ``<output_dir>/completions_<benchmark>.jsonl``.

Examples::

    # the GN-IVO paper's protocol (pass@1 and pass@3)
    python examples/evaluate_math.py --model_name_or_path outputs/gnivo-qwen2.5-math-7b-lora \\
        --benchmarks amc23 minerva olympiadbench aime24 aime25 --k 3 --temperature 0.6 --output_dir eval/gnivo

    # the VIMPO paper's protocol for AIME (avg@32, T=1.0, top_p=0.7)
    python examples/evaluate_math.py --model_name_or_path outputs/vimpo-qwen3-4b-base \\
        --benchmarks aime24 aime25 --k 32 --top_p 0.7 --max_new_tokens 4096 --output_dir eval/vimpo

    # local files
    python examples/evaluate_math.py --model_name_or_path my-model --benchmarks math500=data/math500.parquet aime24
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("evaluate_math")

# generate(prompts, k) -> for each prompt, its k completion texts
GenerateFn = Callable[[list[str], int], list[list[str]]]


def build_arg_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="Hub model id or local directory.")
    parser.add_argument(
        "--benchmarks",
        nargs="+",
        default=["math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench"],
        help="Benchmark names (keys of gnivo_trl.data.DATASETS), each optionally NAME=PATH for a local file.",
    )
    parser.add_argument("--k", type=int, default=4, help="Completions sampled per problem.")
    parser.add_argument(
        "--pass_at", type=int, nargs="+", default=None, help="k values of pass@k to report (default: 1 and --k)."
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (0 = greedy).")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=3072)
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per generate call (transformers).")
    parser.add_argument("--max_problems", type=int, default=None, help="Evaluate only the first N problems.")
    parser.add_argument("--system_prompt", default=None)
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32.")
    parser.add_argument("--tensor_parallel_size", type=int, default=1, help="vLLM tensor parallelism.")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM memory fraction.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="eval_results")
    parser.add_argument("--save_completions", action="store_true", help="Also write every completion (JSONL).")
    return parser


def parse_benchmark(spec: str) -> tuple[str, str | None]:
    """``"math500"`` -> ``("math500", None)``; ``"math500=path/to/file.parquet"`` -> ``("math500", path)``."""
    from gnivo_trl.data import DATASETS

    name, _, path = spec.partition("=")
    if name not in DATASETS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(DATASETS))} (optionally NAME=PATH)")
    return name, path or None


def render_prompts(tokenizer: Any, prompts: Sequence[list[dict[str, str]]]) -> list[str]:
    """Chat messages -> prompt strings with the model's chat template (plain text if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return ["\n\n".join(message["content"] for message in p) + "\n\n" for p in prompts]


def transformers_generator(args: argparse.Namespace) -> tuple[Any, GenerateFn]:
    """The tokenizer and a batched ``transformers`` sampler."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype).to(device).eval()
    greedy = args.temperature == 0

    def generate(prompts: list[str], k: int) -> list[list[str]]:
        outputs: list[list[str]] = []
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = {} if greedy else {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
            with torch.no_grad():
                generated = model.generate(
                    **encoded,
                    max_new_tokens=args.max_new_tokens,
                    num_return_sequences=1 if greedy else k,
                    pad_token_id=tokenizer.pad_token_id,
                    **({"do_sample": False} if greedy else sampling),
                )
            texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            per_prompt = 1 if greedy else k
            for i in range(len(chunk)):
                samples = texts[i * per_prompt : (i + 1) * per_prompt]
                outputs.append(samples * k if greedy else samples)  # greedy: k identical samples
        return outputs

    return tokenizer, generate


def vllm_generator(args: argparse.Namespace) -> tuple[Any, GenerateFn]:
    """The tokenizer and a vLLM sampler (``n=k`` samples per prompt)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model_name_or_path,
        dtype=args.dtype,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    tokenizer = llm.get_tokenizer()

    def generate(prompts: list[str], k: int) -> list[list[str]]:
        params = SamplingParams(
            n=k, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens, seed=args.seed
        )
        results = llm.generate(prompts, params)
        return [[output.text for output in result.outputs] for result in results]

    return tokenizer, generate


def make_generator(args: argparse.Namespace) -> tuple[Any, GenerateFn, str]:
    """Pick the backend: vLLM when importable (``auto``) or asked for, else transformers."""
    if args.backend in ("auto", "vllm"):
        try:
            import vllm  # noqa: F401
        except ImportError:
            if args.backend == "vllm":
                raise
        else:
            return (*vllm_generator(args), "vllm")
    return (*transformers_generator(args), "transformers")


def evaluate_benchmark(
    name: str,
    dataset: Any,
    tokenizer: Any,
    generate: GenerateFn,
    k: int,
    ks: Sequence[int],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sample, grade and summarise one benchmark; returns the summary and per-problem records."""
    from gnivo_trl.evaluation import score_samples, summarize_benchmark

    prompts = render_prompts(tokenizer, dataset["prompt"])
    start = time.perf_counter()
    completions = generate(prompts, k)
    scores = score_samples(completions, dataset["solution"])
    summary = summarize_benchmark(scores, ks)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    records = [
        {"benchmark": name, "prompt": prompt, "solution": gold, "completions": samples, "scores": row}
        for prompt, gold, samples, row in zip(prompts, dataset["solution"], completions, scores, strict=True)
    ]
    return summary, records


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns what is written to ``results.json``."""
    from gnivo_trl.data import load_math_dataset
    from gnivo_trl.evaluation import format_markdown_table

    args = build_arg_parser().parse_args(argv)
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    ks = sorted(set(args.pass_at or [1, args.k]))
    if any(not 1 <= j <= args.k for j in ks):
        raise ValueError(f"--pass_at values must lie in [1, --k={args.k}], got {ks}")
    if args.temperature == 0 and args.k > 1:
        logger.warning("temperature 0 is greedy decoding: the k samples are identical, so pass@k equals pass@1.")
    benchmarks = [parse_benchmark(spec) for spec in args.benchmarks]

    import transformers

    transformers.set_seed(args.seed)
    tokenizer, generate, backend = make_generator(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, Any]] = {}
    for name, path in benchmarks:
        dataset = load_math_dataset(name, path, system_prompt=args.system_prompt)
        if args.max_problems is not None:
            dataset = dataset.select(range(min(args.max_problems, len(dataset))))
        summary, records = evaluate_benchmark(name, dataset, tokenizer, generate, args.k, ks)
        results[name] = summary
        print(f"{name}: " + ", ".join(f"{key}={value}" for key, value in summary.items()), flush=True)
        if args.save_completions:
            with open(output_dir / f"completions_{name}.jsonl", "w") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")

    settings = {
        key: getattr(args, key)
        for key in ("model_name_or_path", "k", "temperature", "top_p", "max_new_tokens", "seed", "system_prompt")
    }
    settings.update(pass_at=ks, backend=backend, benchmarks=args.benchmarks)
    report = {"settings": settings, "results": results}
    (output_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = (
        f"# Evaluation of `{args.model_name_or_path}`\n\n"
        f"{args.k} samples per problem, temperature {args.temperature}, top_p {args.top_p}, "
        f"max {args.max_new_tokens} new tokens, backend {backend}. Scores in %.\n\n" + format_markdown_table(results)
    )
    (output_dir / "results.md").write_text(markdown)
    print(markdown, flush=True)
    return report


if __name__ == "__main__":
    main()
