# ruff: noqa: F401, F811  -- pytest fixtures are imported from test_eval_fixtures, then requested by name
"""posttrain's multiple-choice and perplexity numbers against lm-eval 0.4.13 on local JSONL tasks, offline.

Compared: per-question acc/acc_norm predictions (identical), the aggregated acc/acc_norm and their stderr
(identical), per-text loglikelihood_rolling sums and lm-eval's word_perplexity / bits_per_byte with
stride == context == HFLM's max_length (6 significant digits; in practice they agree to ~1e-7 relative).
Both tokenizer flavours are covered: one without BOS (EOS is the prefix token) and one that prepends BOS.
"""

from __future__ import annotations

import math

import pytest
from test_eval_fixtures import build_bos_tokenizer, mc_rows, one_torch_thread, text_rows, tiny, write_jsonl

from posttrain.eval.multiple_choice import questions_from_rows, score_choices
from posttrain.eval.perplexity import text_loglikelihoods

lm_eval = pytest.importorskip("lm_eval")

SIX_DIGITS = 5e-7  # relative tolerance of "equal to 6 significant digits"


@pytest.fixture(scope="module", params=["eos-prefix", "bos-tokenizer"])
def tokenizer(request, tiny):
    if request.param == "eos-prefix":
        return tiny["tokenizer"]
    return build_bos_tokenizer(tiny["tokenizer"], tiny["root"] / "bos_tokenizer")


def _task_yaml(task_dir, name, data, output_type, metrics, extra=""):
    task_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data}",
        "test_split: test",
        f"output_type: {output_type}",
        *extra.splitlines(),
        "metric_list:",
    ]
    lines += [f"  - metric: {m}" for m in metrics]
    (task_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def _simple_evaluate(lm, task_dir, name):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
    )


def test_multiple_choice_matches_lm_eval(tiny, tokenizer, tmp_path):
    from lm_eval.models.huggingface import HFLM

    rows = mc_rows(40, seed=11)
    rows[0]["question"] = ""  # empty context: lm-eval conditions on the prefix token
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    extra = 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"'
    _task_yaml(tmp_path / "tasks", "parity_mc", data, "multiple_choice", ["acc", "acc_norm"], extra)
    out = _simple_evaluate(HFLM(pretrained=tiny["model"], tokenizer=tokenizer), tmp_path / "tasks", "parity_mc")

    questions = questions_from_rows(rows, "mc.jsonl")
    ours = score_choices(tiny["model"], tokenizer, questions, batch_size=7)
    samples = sorted(out["samples"]["parity_mc"], key=lambda s: s["doc_id"])
    theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    for q_ours, q_theirs in zip(ours.loglikelihoods, theirs):
        assert q_ours == pytest.approx(q_theirs, rel=1e-5, abs=1e-4)
    assert [s["acc"] for s in samples] == [float(p == q.answer) for p, q in zip(ours.predictions(), questions)]
    assert [s["acc_norm"] for s in samples] == [float(p == q.answer) for p, q in zip(ours.predictions(True), questions)]
    metrics, res = ours.metrics(), out["results"]["parity_mc"]
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert metrics[key] == pytest.approx(res[f"{key},none"], rel=1e-12), key


@pytest.mark.parametrize("context", [16, 48])
def test_rolling_perplexity_matches_lm_eval(tiny, tokenizer, tmp_path, context):
    """stride == context == max_length: the same per-text sums, hence the same word_perplexity and bits_per_byte."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    rows = text_rows(10, seed=5)
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    _task_yaml(
        tmp_path / "tasks",
        "parity_ppl",
        data,
        "loglikelihood_rolling",
        ["word_perplexity", "bits_per_byte"],
        'doc_to_text: ""\ndoc_to_target: "{{text}}"',
    )
    lm = HFLM(pretrained=tiny["model"], tokenizer=tokenizer, max_length=context, batch_size=4)
    texts = [r["text"] for r in rows]
    theirs = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts], disable_tqdm=True
    )
    res = _simple_evaluate(lm, tmp_path / "tasks", "parity_ppl")["results"]["parity_ppl"]

    ours = text_loglikelihoods(tiny["model"], tokenizer, texts, context=context, stride=context, batch_size=3)
    assert ours.per_text == pytest.approx(theirs, rel=SIX_DIGITS)
    metrics = ours.metrics()
    assert metrics["word_perplexity"] == pytest.approx(res["word_perplexity,none"], rel=SIX_DIGITS)
    assert metrics["bits_per_byte"] == pytest.approx(res["bits_per_byte,none"], rel=SIX_DIGITS)


def test_smaller_stride_scores_every_token_once_with_more_context(tiny):
    """stride < context changes the conditioning, not the set of scored tokens: same target count, other sums."""
    texts = [r["text"] for r in text_rows(6, seed=8)]
    disjoint = text_loglikelihoods(tiny["model"], tiny["tokenizer"], texts, context=32, stride=32)
    sliding = text_loglikelihoods(tiny["model"], tiny["tokenizer"], texts, context=32, stride=8)
    assert disjoint.n_targets == sliding.n_targets == sum(len(tiny["tokenizer"].encode(t)) for t in texts)
    assert not math.isclose(disjoint.metrics()["perplexity"], sliding.metrics()["perplexity"], rel_tol=1e-9)
