"""gnivo_trl.credit: the pure functions against naive loops, the scorer against the trainers' own scores and a float64
full softmax, step units as GN-IVO's, HTML escaping of hostile text, the command line, and benchmarks/credit.py."""

import random
import time
from types import SimpleNamespace

import pytest
import torch
from trainer_harness import build_trainer, moved_policy_batch

from gnivo_trl.credit import (
    CompletionCredit,
    centred_token_rewards,
    completion_credit,
    main,
    prepare_for_scoring,
    readout_token_values,
    render_html,
    render_png,
    score_completions,
    step_boundaries,
    step_credit,
    token_log_ratios,
    token_step_index,
)
from gnivo_trl.losses import unit_boundaries
from gnivo_trl.steps import TokenTextCache, step_unit_ends

# --------------------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------------------


def _random_inputs(seed: int, rows: int = 6, length: int = 13):
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, length, generator=generator) * 3
    ref_logp = -torch.rand(rows, length, generator=generator) * 3
    token_kl = torch.rand(rows, length, generator=generator)
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    lengths[0] = 0  # a fully masked row
    lengths[1] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    logp[mask == 0] = float("-inf")  # padding may hold anything: nothing of it may leak into a sum
    ends = torch.rand(rows, length, generator=generator) < 0.3
    return logp, ref_logp, token_kl, mask, ends


def _naive_steps(values, mask, ends):
    """Per-row lists of step totals, by a Python loop over positions, in float64."""
    rows = []
    for i in range(values.size(0)):
        valid = [t for t in range(values.size(1)) if mask[i, t] > 0]
        totals, running = [], 0.0
        for t in valid:
            running += float(values[i, t])
            if (ends is None or bool(ends[i, t])) or t == valid[-1]:
                totals.append(running)
                running = 0.0
        rows.append(totals)
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("token_units", [False, True])
def test_step_credit_equals_a_naive_loop(seed, token_units):
    logp, ref_logp, token_kl, mask, ends = _random_inputs(seed)
    ends = None if token_units else ends
    for values, expected_token in (
        (token_log_ratios(logp, ref_logp, mask), lambda i, t: logp[i, t].double() - ref_logp[i, t].double()),
        (
            centred_token_rewards(logp, ref_logp, token_kl, mask),
            lambda i, t: logp[i, t].double() - ref_logp[i, t].double() - token_kl[i, t].double(),
        ),
    ):
        assert values.dtype == torch.float32 and torch.isfinite(values).all()
        for i in range(mask.size(0)):
            for t in range(mask.size(1)):
                want = float(expected_token(i, t)) if mask[i, t] else 0.0
                assert values[i, t].item() == pytest.approx(want, abs=1e-6)
        credit = step_credit(values, mask, ends)
        naive = _naive_steps(values.double(), mask, ends)
        assert credit.step_totals.dtype == torch.float32
        assert credit.num_steps.tolist() == [len(row) for row in naive]
        assert credit.step_totals.size(1) == max(max(len(row) for row in naive), 1)
        for i, totals in enumerate(naive):
            n = len(totals)
            assert credit.valid[i].tolist() == [s < n for s in range(credit.valid.size(1))]
            torch.testing.assert_close(
                credit.step_totals[i, :n].double(), torch.tensor(totals, dtype=torch.float64), atol=1e-5, rtol=0
            )
            assert (credit.step_totals[i, n:] == 0).all()
            cumulative = torch.tensor(totals, dtype=torch.float64).cumsum(0)
            torch.testing.assert_close(credit.value_curve[i, :n].double(), cumulative, atol=1e-5, rtol=0)
            held = cumulative[-1].item() if n else 0.0
            assert torch.allclose(credit.value_curve[i, n:].double(), torch.tensor(held, dtype=torch.float64))


def test_token_step_index_counts_closed_steps():
    logp, _, _, mask, ends = _random_inputs(3)
    index = token_step_index(mask, ends)
    closes = unit_boundaries(mask, ends)
    for i in range(mask.size(0)):
        step = 0
        for t in range(mask.size(1)):
            if mask[i, t] == 0:
                assert index[i, t] == -1
                continue
            assert index[i, t] == step
            step += int(closes[i, t])


def test_step_boundaries_are_the_trainers_step_units_and_the_verifiers_pieces():
    """Steps are GNIVOTrainer's units (step_unit_ends + unit_boundaries) and split a synthetic solution exactly
    where gnivo_trl.synthetic.earliest_wrong_step splits it."""
    from gnivo_trl.synthetic import build_tokenizer, solution_text

    tokenizer = build_tokenizer()
    texts = [solution_text("3+4*2-5"), solution_text("1*5*0+7", [1], random.Random(0)), "no steps at all"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).float()
    cache = TokenTextCache(tokenizer)
    ends = step_boundaries(ids, mask, cache, "\n\n")
    assert torch.equal(ends, unit_boundaries(mask, step_unit_ends(ids, mask, cache, "\n\n")))
    index = token_step_index(mask, ends)
    for row, text in enumerate(texts):
        pieces = text.split("\n\n")
        tokens = cache(rows[row])
        steps = [""] * len(pieces)
        for token, step in zip(tokens, index[row, : len(tokens)].tolist(), strict=True):
            steps[step] += token
        expected = [p + "\n\n" for p in pieces[:-1]] + [pieces[-1] + tokenizer.eos_token]
        assert steps == expected


# --------------------------------------------------------------------------------------------------------------------
# The scorer
# --------------------------------------------------------------------------------------------------------------------


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def test_scores_equal_vimpo_trainers_own_token_scores(tiny_model_dir, tmp_path):
    """The trainer's loss-time log-probs, reference log-probs and exact KL, from the same kernels."""
    trainer = build_trainer("vimpo", tiny_model_dir, str(tmp_path), temperature=0.7, vimpo_kl_chunk_size=5)
    batch = moved_policy_batch(trainer, seed=0)
    expected = trainer._token_scores(trainer.model, batch)
    completion_mask = batch["completion_mask"]
    assert (completion_mask == 0).any() and completion_mask.sum() > 0  # ragged completions
    prompts = _rows(batch["prompt_ids"], batch["prompt_mask"])
    completions = _rows(batch["completion_ids"], completion_mask)
    scores = score_completions(
        trainer.model, trainer.ref_model, trainer.processing_class, prompts, completions, batch_size=3, kl_chunk_size=7
    )
    width = scores.mask.size(1)
    assert torch.equal(scores.mask, completion_mask[:, :width].float())
    assert completion_mask[:, width:].sum() == 0
    assert expected.token_kl.max() > 1e-3
    for name in ("logp", "ref_logp", "token_kl"):
        torch.testing.assert_close(
            getattr(scores, name), getattr(expected, name)[:, :width].detach(), atol=1e-6, rtol=0
        )
    assert not scores.logp.requires_grad


def _full_softmax(model, ids, attention, width, temperature):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1].double()
    return (logits / temperature).log_softmax(-1)


def test_plain_models_scored_after_prepare_equal_a_float64_full_softmax(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gnivo_trl.testing import save_tiny_model

    policy_dir = save_tiny_model(tmp_path / "policy", seed=1)
    reference_dir = save_tiny_model(tmp_path / "reference", seed=2)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    for model in (policy, reference):
        with torch.no_grad():  # larger logits than the initialisation's, so the distributions differ visibly
            model.get_output_embeddings().weight.mul_(20.0)
    prompts = [[{"role": "user", "content": "What is 3 + 4?"}], "plain text prompt"]
    completions = ["Step 1: 3 + 4 = 7\n\nThe answer is \\boxed{7}.", "seven"]
    with pytest.raises(RuntimeError, match="add_fused_lm_head"):
        score_completions(policy, reference, tokenizer, prompts, completions)
    prepare_for_scoring(policy, temperature=0.7)
    prepare_for_scoring(reference, temperature=0.7)
    prepare_for_scoring(policy, temperature=3.0)  # idempotent: TRL's head is already there, nothing changes
    scores = score_completions(policy, reference, tokenizer, prompts, completions, batch_size=1)
    assert scores.prompts[0].startswith("<|im_start|>user\nWhat is 3 + 4?")
    for row, (prompt_text, completion) in enumerate(zip(scores.prompts, completions, strict=True)):
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n = len(completion_ids)
        ids = torch.tensor([prompt_ids + completion_ids])
        attention = torch.ones_like(ids)
        labels = torch.tensor(completion_ids)[:, None]
        policy_lp = _full_softmax(policy, ids, attention, n, 0.7)[0]
        reference_lp = _full_softmax(reference, ids, attention, n, 0.7)[0]
        assert scores.mask[row].sum() == n and scores.completion_ids[row, :n].tolist() == completion_ids
        torch.testing.assert_close(
            scores.logp[row, :n].double(), policy_lp.gather(-1, labels)[:, 0], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            scores.ref_logp[row, :n].double(), reference_lp.gather(-1, labels)[:, 0], atol=1e-5, rtol=0
        )
        kl = (policy_lp.exp() * (policy_lp - reference_lp)).sum(-1)
        assert kl.max() > 1e-2
        torch.testing.assert_close(scores.token_kl[row, :n].double(), kl, atol=1e-5, rtol=1e-4)
        assert "".join(scores.tokens[row]) == completion + tokenizer.eos_token
    # The readouts and a row's credit follow from the scores.
    torch.testing.assert_close(
        readout_token_values(scores, "centred"), scores.logp - scores.ref_logp - scores.token_kl, atol=0, rtol=0
    )
    credit = completion_credit(scores, 0, "log_ratio", label="policy")
    assert len(credit.step_totals) == 2 and credit.step_texts()[0] == "Step 1: 3 + 4 = 7\n\n"
    assert sum(credit.step_totals) == pytest.approx(sum(credit.token_values), abs=1e-5)
    assert credit.value_curve[-1] == pytest.approx(sum(credit.token_values), abs=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Pictures and the command line
# --------------------------------------------------------------------------------------------------------------------

HOSTILE = ['<script>alert("x")</script>', " a & b ", "'quoted' \"double\"", "\n\n", '"><img src=x onerror=alert(1)>']


def _hostile_example() -> CompletionCredit:
    return CompletionCredit(
        prompt='<b>prompt</b> & "more"',
        tokens=HOSTILE,
        token_values=[-1.0, 0.5, 0.0, -0.25, 2.0],
        step_of_token=[0, 0, 0, 0, 1],
        step_totals=[-0.75, 2.0],
        value_curve=[-0.75, 1.25],
        readout="centred",
        label="<i>policy</i> $x$",
    )


PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "div", "span"}


def _tags(page: str) -> set[str]:
    """Every start tag of ``page``, as a real HTML parser sees them."""
    from html.parser import HTMLParser

    tags = set()

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.add(tag)

    Collector().feed(page)
    return tags


def test_html_escapes_hostile_text():
    page = render_html([_hostile_example()], title='<title>"credit"</title>')
    assert _tags(page) == PAGE_TAGS  # no script, img, b or i element came from the text
    for forbidden in ("<script", "<img", "<b>", "<i>", '"credit"', "onerror=alert(1)>"):
        assert forbidden not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert " a &amp; b " in page and "&#x27;quoted&#x27; &quot;double&quot;" in page
    assert "&lt;b&gt;prompt&lt;/b&gt; &amp; &quot;more&quot;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    # Attributes stay closed: every title="..." attribute ends before the next tag.
    assert page.count('title="') == len(HOSTILE)
    assert "step 1: -0.750" in page and "step 2: +2.000" in page and "legend" in page


def test_png_is_written_even_with_mathtext_in_model_text(tmp_path):
    path = tmp_path / "credit.png"
    render_png([_hostile_example(), _hostile_example()], path, title="$unbalanced")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_samples_scores_and_writes_both_files(tiny_model_dir, tmp_path, capsys):
    from gnivo_trl.testing import save_tiny_model

    reference = save_tiny_model(tmp_path / "reference", seed=1)
    out = tmp_path / "sampled"
    record = main(
        ["--model", tiny_model_dir, "--reference", reference, "--prompt", "What is 3 + 4?", "--output-dir", str(out)]
        + ["--max-new-tokens", "12", "--temperature", "0.8"]
    )
    assert (out / "credit.html").stat().st_size > 0 and (out / "credit.png").stat().st_size > 0
    assert (out / "credit.json").exists() and record["completion"]
    assert "lowest: step" in capsys.readouterr().out
    out = tmp_path / "given"
    main(
        ["--model", tiny_model_dir, "--reference", reference, "--prompt", "<b>hi</b>", "--output-dir", str(out)]
        + ["--completion", 'Step <script>1</script>\n\n"two" & more']
    )
    page = (out / "credit.html").read_text()
    assert _tags(page) <= PAGE_TAGS and "&lt;b&gt;hi&lt;/b&gt;" in page
    assert "step 2:" in page
    assert (out / "credit.png").exists()


# --------------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------------

from benchmarks import credit as credit_benchmark  # noqa: E402  (benchmarks/credit.py)


def test_localisation_readout_and_metrics():
    credits = [[0.5, -2.0, 1.0], [0.1, 0.2], [-3.0], [1.0, 1.0, -0.5, 2.0]]
    labels = [1, None, 0, 3]
    predictions = credit_benchmark.predict_first_below(credits, [-1.0, 0.0, 10.0, float("-inf")])
    assert predictions.tolist() == [[1, -1, 0, -1], [1, -1, 0, 2], [0, 0, 0, 0], [-1, -1, -1, -1]]
    scores = credit_benchmark.localisation(predictions[1], labels)
    assert scores["error_accuracy"] == pytest.approx(2 / 3) and scores["correct_accuracy"] == 1.0
    assert scores["f1"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert credit_benchmark.localisation(predictions[3], labels)["f1"] == 0.0  # always "no error"
    # The validation threshold: the best F1 over candidates, here a perfect split is possible.
    threshold = credit_benchmark.choose_threshold(credits[:3], labels[:3])
    assert credit_benchmark.localisation(
        credit_benchmark.predict_first_below(credits[:3], [threshold])[0], labels[:3]
    )["f1"] == pytest.approx(1.0)
    # Labels past the scored steps (cut off after a delimiter) move to the last scored step.
    assert credit_benchmark.aligned_labels([5, None, 0], [[1.0, 2.0], [1.0], [0.0]]) == [1, None, 0]


def test_a_policy_may_carry_its_own_learning_rate():
    args = credit_benchmark.parse_args(["--methods", "gnivo-step@4e-4", "vimpo-b5e-2-c0"])
    assert args.methods == ["grpo", "gnivo-step@4e-4", "vimpo-b5e-2-c0"]  # GRPO is always the comparison
    assert credit_benchmark.policy_spec("gnivo-step@4e-4") == ("gnivo-step", 4e-4)
    assert credit_benchmark.policy_spec("grpo") == ("grpo", None)
    # The shared rate's runs keep their cache key; a policy at its own rate gets its own.
    assert credit_benchmark.run_key("gnivo-step", 0, args) == "gnivo-step-seed0-100x8x8-lr0.0002"
    assert credit_benchmark.run_key("gnivo-step@4e-4", 0, args) == "gnivo-step-seed0-100x8x8-lr0.0004"
    for bad in ("gnivo-steps", "grpo@", "grpo@-1e-4", "grpo@fast"):
        with pytest.raises(SystemExit):
            credit_benchmark.parse_args(["--methods", bad])


def test_step_auroc_equals_pairwise_counting():
    rng = random.Random(0)
    credits = [[round(rng.gauss(0, 1), 1) for _ in range(rng.randint(1, 5))] for _ in range(40)]
    labels = [None if rng.random() < 0.4 else rng.randrange(len(c)) for c in credits]
    wrong = [c[label] for c, label in zip(credits, labels) if label is not None]
    right = [v for c, label in zip(credits, labels) for v in (c if label is None else c[:label])]
    pairs = [(w < r) + 0.5 * (w == r) for w in wrong for r in right]  # a wrong step should have lower credit
    assert credit_benchmark.step_auroc(credits, labels) == pytest.approx(sum(pairs) / len(pairs))
    assert (
        credit_benchmark.step_auroc([[1.0, 0.0]], [1]) == 1.0 and credit_benchmark.step_auroc([[0.0, 1.0]], [1]) == 0.0
    )


@pytest.mark.slow
def test_credit_benchmark_smoke(tmp_path):
    """Two methods, one seed, one optimizer step, from a tiny warm start: every table row, the plot and the example."""
    report = tmp_path / "credit.md"
    argv = [
        "--methods", "grpo", "vimpo-b5e-2-c0", "--seeds", "0", "--steps", "1", "--prompts-per-step", "2",
        "--num-generations", "2", "--eval-problems", "4", "--validation-problems", "12", "--test-problems", "12",
        "--warm-start-hidden", "16", "--warm-start-layers", "1", "--warm-start-examples", "64",
        "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"), "--report", str(report),
        "--plot", str(tmp_path / "credit.png"), "--example", str(tmp_path / "example"),
    ]  # fmt: skip
    per_seed = credit_benchmark.main(argv)
    text = report.read_text()
    assert "| log-ratio | grpo |" in text and "| log-ratio - KL | vimpo-b5e-2-c0 |" in text
    assert "| baseline | random step |" in text and "| log-prob | warm start (no RL) |" in text
    for path in ("credit.png", "example.html", "example.png"):
        assert (tmp_path / path).stat().st_size > 0
    metrics = per_seed[0]["metrics"]
    assert 0 <= metrics["warm|grpo|centred"]["f1"] <= 1 and "threshold" in metrics["warm|grpo|centred"]
    # Resumable: a second invocation reuses every cached run, pool and score, and keeps the hand-written reading.
    report.write_text(text + "\n## Reading\n\nWritten by hand.\n")
    started = time.perf_counter()
    credit_benchmark.main(argv)
    assert time.perf_counter() - started < 15
    regenerated = report.read_text()
    assert regenerated.endswith("\n## Reading\n\nWritten by hand.\n") and regenerated.count("## Reading") == 1
    assert "| log-ratio | grpo |" in regenerated


def test_a_rerun_keeps_the_hand_written_title_introduction_and_reading(tmp_path):
    from benchmarks import reporting

    generated = "# Generated title\n\nGenerated by `benchmarks/credit.py` on today.\n\n| new | table |\n"
    report = tmp_path / "report.md"
    assert credit_benchmark.keep_hand_written(report, generated) == generated  # nothing to keep yet
    reporting.write_report(report, generated)
    assert credit_benchmark.keep_hand_written(report, generated) == generated  # nothing written by hand
    written = (
        "# A follow-up: longer training\n\nProvenance: old.\n\n> Why this report exists,\n> in two lines.\n\n"
        "Generated by `benchmarks/credit.py` on an old day.\n\n| old | table |\n\n## Reading\n\nBy hand.\n"
    )
    report.write_text(written)
    kept = credit_benchmark.keep_hand_written(report, generated)
    assert kept == (
        "# A follow-up: longer training\n\n> Why this report exists,\n> in two lines.\n\n"
        "Generated by `benchmarks/credit.py` on today.\n\n| new | table |\n\n## Reading\n\nBy hand.\n"
    )
    reporting.write_report(report, kept)  # a second rerun keeps each part once
    assert credit_benchmark.keep_hand_written(report, generated) == kept


def test_callback_renders_credit_during_training_without_changing_it(tiny_model_dir, tmp_path):
    from trainer_harness import parameter_update

    from gnivo_trl.credit import CreditCallback

    baseline = parameter_update(build_trainer("gnivo", tiny_model_dir, str(tmp_path / "plain"), max_steps=2))
    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path / "run"), max_steps=2)
    callback = CreditCallback(
        trainer.processing_class, [[{"role": "user", "content": "What is 3 + 4?"}], "x <b>"], every=2, max_new_tokens=8
    )
    trainer.add_callback(callback)
    update = parameter_update(trainer)
    for name, change in baseline.items():
        assert torch.equal(update[name], change), name  # sampling inside the run restores its RNG and mode
    names = sorted(p.name for p in (tmp_path / "run" / "credit").iterdir())
    assert names == ["step-000000.html", "step-000000.png", "step-000002.html", "step-000002.png"]
    first = (tmp_path / "run" / "credit" / "step-000000.html").read_text()
    assert "step 0, completion 2" in first and "&lt;b&gt;" in first and "<b>" not in first
    assert callback.reference is not trainer.model and not any(
        p.requires_grad for p in callback.reference.parameters()
    )


def test_prepare_never_patches_a_model_that_carries_trls_head_under_a_wrapper(tiny_model_dir, tmp_path):
    """Under bf16 accelerate wraps the trainer's (patched) forward: the callback's prepare must find TRL's head
    down the wrapper chain and leave the live policy's forward as it is (a second patch, with default outputs, made
    TRL's next loss step fail on a missing entropy)."""
    from gnivo_trl.credit import prepare_for_scoring

    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path), bf16=True)
    assert trainer.accelerator.native_amp
    model = trainer.accelerator.prepare_model(trainer.model)
    forward = model.forward
    assert prepare_for_scoring(model, temperature=0.5) is model
    assert model.forward is forward


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (dict(deepspeed_plugin=SimpleNamespace(zero_stage=3), fsdp=""), "DeepSpeed ZeRO-3"),
        (dict(deepspeed_plugin=None, fsdp="full_shard"), "FSDP"),
        (dict(deepspeed_plugin=SimpleNamespace(zero_stage=2), fsdp=""), None),
        (dict(deepspeed_plugin=None, fsdp=""), None),
    ],
)
def test_callback_refuses_models_sharded_over_processes(args, refused):
    """Sampling on the main process alone would hang the other ranks of a sharded model: refused when the trainer
    is built (on_init_end) and when training starts (a callback added later); ZeRO-2 and DDP are fine (the run in
    test_user_setups.py covers them and the ZeRO-3 refusal under a real launch)."""
    from gnivo_trl.credit import CreditCallback

    callback = CreditCallback(None, ["x"], every=1)
    if refused is None:
        callback.on_init_end(SimpleNamespace(**args), None, None)
        return
    for event in (callback.on_init_end, callback.on_train_begin):
        with pytest.raises(ValueError, match=f"CreditCallback does not support {refused}"):
            event(SimpleNamespace(**args), None, None)


def test_callback_warns_that_a_resumed_run_reads_credit_against_the_checkpoint(tiny_model_dir, tmp_path, caplog):
    from gnivo_trl.credit import CreditCallback

    trainer = build_trainer("gnivo", tiny_model_dir, str(tmp_path), max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    resumed = build_trainer("gnivo", tiny_model_dir, str(tmp_path), max_steps=3)
    resumed.add_callback(CreditCallback(resumed.processing_class, ["What is 3 + 4?"], every=5, max_new_tokens=4))
    with caplog.at_level("WARNING", logger="gnivo_trl.credit"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "training resumes at step 2" in caplog.text and "not the initial model" in caplog.text


def test_benchmark_example_heading_reads_as_text():
    """The embedded example's heading writes the solution as steps, not as a Python string with escaped newlines."""
    title = credit_benchmark.example_title("0-3-1-0*9", 0)
    assert title == (
        "0-3-1-0*9: the first wrong step is step 1 (verifier); correct solution: 0-3=7; 7-1=6; 6-0=6; 6*9=4; \\boxed{4}"
    )
    assert "\\n" not in title and "'" not in title
