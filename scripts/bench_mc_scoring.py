"""Multiple-choice scoring: posttrain vs lm-eval 0.4.13 on the same model and task, offline, in one run.

    python scripts/bench_mc_scoring.py                   # 200 questions x 4 choices, ~92-token contexts, 1 thread
    python scripts/bench_mc_scoring.py --threads 2 --lm-eval-batch-size 16 --repeats 5

Builds a random LlamaForCausalLM (vocab ~2k, hidden 256, 4 layers) and a byte-level BPE tokenizer trained on
generated text, writes the questions as JSONL plus an lm-eval YAML task, then times, interleaved and `--repeats`
times each (this machine's CPU time is shared, so medians are reported):
- scoring: lm-eval's `HFLM.loglikelihood` on the task's (context, " " + choice) requests vs posttrain's
  `score_choices` (the model work, where the speed-up comes from);
- end to end: `lm_eval.simple_evaluate` on the YAML task vs posttrain reading the JSONL and scoring it.
It checks that both give identical per-question acc and acc_norm predictions and exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from posttrain.eval.multiple_choice import questions_from_rows, score_choices  # noqa: E402
from posttrain.eval.suite import read_jsonl  # noqa: E402


def pseudo_words(n: int, rng: random.Random) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def build_model_and_tokenizer(out: Path, vocab_size: int, hidden: int, layers: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = pseudo_words(3000, rng)
    corpus = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return model, tokenizer, words


def write_task(out: Path, words: list[str], n_questions: int, n_choices: int, context_words: int, seed: int) -> Path:
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(n_questions):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(context_words // 2, context_words * 3 // 2)))
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(n_choices)]
        rows.append(
            {"question": f"Question: {question}?\nAnswer:", "choices": choices, "answer": rng.randrange(n_choices)}
        )
    data = out / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "tasks").mkdir(exist_ok=True)
    (out / "tasks" / "bench_mc.yaml").write_text(
        "task: bench_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return data


def lm_eval_scoring(lm, questions):
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, (q.context, " " + c), i) for q in questions for i, c in enumerate(q.choices)]
    start = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    seconds = time.perf_counter() - start
    lls, it = [], iter(ll for ll, _ in out)
    for q in questions:
        lls.append([next(it) for _ in q.choices])
    return seconds, lls


def lm_eval_end_to_end(lm, task_dir: Path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    res = simple_evaluate(
        model=lm,
        tasks=["bench_mc"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
    )
    seconds = time.perf_counter() - start
    by_doc = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in res["samples"]["bench_mc"]}
    return seconds, [by_doc[i] for i in range(len(by_doc))], res["results"]["bench_mc"]


def posttrain_end_to_end(model, tokenizer, data: Path, batch_size: int):
    start = time.perf_counter()
    questions = questions_from_rows(read_jsonl(data, ("choices", "answer")), str(data))
    scores = score_choices(model, tokenizer, questions, batch_size=batch_size, desc="posttrain")
    metrics = scores.metrics()
    return time.perf_counter() - start, scores, metrics


def predictions(lls, questions, normalize: bool):
    from posttrain.eval.multiple_choice import ChoiceScores

    return ChoiceScores(lls, questions).predictions(normalize)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--context-words", type=int, default=55, help="mean words per question (~100 tokens at 55)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lm-eval-batch-size", type=int, default=1, help="lm-eval's default is 1")
    parser.add_argument("--batch-size", type=int, default=16, help="posttrain: questions per forward")
    parser.add_argument("--repeats", type=int, default=3)
    # One thread by default: on a shared 2-core machine, OpenMP workers spinning against other processes made
    # 2-thread timings swing 4x between identical runs; one thread keeps the comparison reproducible.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def timed_runs(args, model, tokenizer, questions, data: Path, task_dir: Path) -> dict:
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.lm_eval_batch_size)
    score_choices(model, tokenizer, questions[:8], batch_size=args.batch_size)  # warm-up: first-call allocations
    lm_eval_scoring(lm, questions[:8])
    t = {"lm_scoring": [], "pt_scoring": [], "lm_e2e": [], "pt_e2e": []}
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour slows both sides alike
        seconds, lm_lls = lm_eval_scoring(lm, questions)
        t["lm_scoring"].append(seconds)
        start = time.perf_counter()
        pt = score_choices(model, tokenizer, questions, batch_size=args.batch_size, desc="posttrain")
        t["pt_scoring"].append(time.perf_counter() - start)
        seconds, e2e_lls, lm_results = lm_eval_end_to_end(lm, task_dir)
        t["lm_e2e"].append(seconds)
        seconds, _, pt_metrics = posttrain_end_to_end(model, tokenizer, data, args.batch_size)
        t["pt_e2e"].append(seconds)
    return dict(times=t, lm_lls=lm_lls, e2e_lls=e2e_lls, lm_results=lm_results, pt=pt, pt_metrics=pt_metrics)


def check_and_print(run: dict, questions, repeats: int) -> bool:
    ok, pt, lm_results, pt_metrics = True, run["pt"], run["lm_results"], run["pt_metrics"]
    for name, lls in (("lm-eval scoring", run["lm_lls"]), ("lm-eval simple_evaluate", run["e2e_lls"])):
        for norm in (False, True):
            same = predictions(lls, questions, norm) == pt.predictions(norm)
            ok &= same
            print(f"{'acc_norm' if norm else 'acc':8s} predictions identical to {name}: {same}")
    max_diff = max(abs(a - b) for la, lb in zip(run["lm_lls"], pt.loglikelihoods) for a, b in zip(la, lb))
    print(f"max |loglikelihood difference|: {max_diff:.2e}")
    print(
        f"acc: lm-eval {lm_results['acc,none']:.4f}, posttrain {pt_metrics['acc']:.4f}; "
        f"acc_norm: lm-eval {lm_results['acc_norm,none']:.4f}, posttrain {pt_metrics['acc_norm']:.4f}"
    )
    ok &= lm_results["acc,none"] == pt_metrics["acc"] and lm_results["acc_norm,none"] == pt_metrics["acc_norm"]
    med = {k: statistics.median(v) for k, v in run["times"].items()}
    for label, lm_key, pt_key in (("scoring", "lm_scoring", "pt_scoring"), ("end to end", "lm_e2e", "pt_e2e")):
        print(
            f"{label:10s} (median of {repeats}): lm-eval {med[lm_key]:.3f} s, posttrain {med[pt_key]:.3f} s, "
            f"ratio {med[lm_key] / med[pt_key]:.2f}x"
        )
    print("all runs (s):", json.dumps({k: [round(x, 3) for x in v] for k, v in run["times"].items()}))
    return ok


def main() -> int:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        model, tokenizer, words = build_model_and_tokenizer(out, args.vocab, args.hidden, args.layers, args.seed)
        data = write_task(out, words, args.questions, args.choices, args.context_words, args.seed)
        questions = questions_from_rows(read_jsonl(data), str(data))
        ctx_tokens = statistics.mean(len(tokenizer.encode(q.context)) for q in questions)
        print(
            f"model: vocab {len(tokenizer)}, hidden {args.hidden}, {args.layers} layers, "
            f"{sum(p.numel() for p in model.parameters()):,} params; torch threads {torch.get_num_threads()}"
        )
        print(f"task: {len(questions)} questions x {args.choices} choices, mean context {ctx_tokens:.1f} tokens")
        run = timed_runs(args, model, tokenizer, questions, data, out / "tasks")
    return 0 if check_and_print(run, questions, args.repeats) else 1


if __name__ == "__main__":
    sys.exit(main())
