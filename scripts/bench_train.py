"""Training throughput: posttrain's defaults vs a plain TRL script with TRL's defaults vs TRL tuned, in one run.

    python scripts/bench_train.py --mode cpu              # small model, ~5 min on 2 cores
    python scripts/bench_train.py --mode gpu              # Qwen2.5-0.5B shape, a few minutes on one H100/H200
    python scripts/bench_train.py --mode cpu --task dpo   # only the DPO comparison (--task sft: only SFT)
    python scripts/bench_train.py --mode smoke            # seconds: checks that the script runs

Everything is offline: a byte-level BPE tokenizer with 996 made-up words of one token each, a random-init Qwen2
model saved once (every variant starts from the same weights) and synthetic documents: word sequences from a
fixed random bigram table (each word has 4 possible successors), so the loss can fall from ~ln(vocab) towards
ln(4), with lengths uniform in [max_length / 32, max_length] tokens. Each variant runs in its own process (clean
peak memory) on the same documents, one epoch, with the same learning rate and schedule (linear, no warmup:
TRL's default schedule), batch 8:

SFT  posttrain      posttrain's sft recipe with every throughput setting at its default (packing, auto
                    checkpointing/accumulation, fused AdamW, Liger when installed); the step's token budget is
                    batch 8's worth of tokens, so it takes about as many optimizer steps as TRL.
     trl_defaults   SFTTrainer with SFTConfig's defaults (gradient checkpointing on, no packing, padding).
     trl_no_ckpt    TRL tuned: gradient checkpointing off.
     trl_packed     TRL tuned: checkpointing off + packing (bfd, padding-free), 4 rows per batch (~the same tokens).
DPO  posttrain      posttrain's dpo recipe defaults: padding-free batches, reference log-probs precomputed once
                    (cold cache: their cost is in the set-up time), auto checkpointing.
     trl_defaults   DPOTrainer with DPOConfig's defaults and a second copy as the reference (as the anchors').
     trl_no_ckpt    the same with gradient checkpointing off.
     posttrain_warm posttrain again, afterwards, with the reference cache the first run filled (a rerun or a
                    beta sweep): its set-up has no reference pass.

Measured: real (non-padding) tokens/s or pairs/s over the steps after the first `warmup` ones (wall-clock when the
variants run one after the other, as on a GPU; step time only in CPU lockstep mode, see Clock), set-up time (model
loading, tokenizing, reference pass: from the start until train() begins), set-up plus all steps (DPO trains one
epoch, 50 steps over the 400 pairs, so that this is the time to train on them; on a GPU TRL's DPO variants stop
after 20 steps, as the anchors' do, to save device time: their rate and set-up are still measured), peak memory
(CUDA peak allocated; on CPU the process's peak RSS), and the losses: SFT compares the exact per-token loss on
held-out documents after the epoch (the same documents and tokens for every variant) and the mean training loss over
the last quarter of the steps; DPO compares the losses step by step (same pairs in the same order). Prints a table
and the ratios; writes bench_train.json to $OUT (or --out). CPU timings on a shared machine are indicative only.
Exploration variants (--extra) add posttrain runs with one setting changed, and posttrain_profile (the defaults
under torch.profiler for 3 steps: GPU kernel time per step against the wall time says host- or GPU-bound), and
posttrain_cudagraphs (full rows and each layer's passes as CUDA graphs: an idea under test, bench_train_explore.py).

Noise on a GPU host: the 0.5B step is host-bound, so its rate follows the host CPU (two H200 calls of the same code
differed by 1.4x, the first training run after the machine started being the slower). Hence, on a GPU: a throwaway
posttrain_settle run first (--settle), each result records the host's load average, --rounds N measures posttrain
and trl_defaults (and --round-extra variants) N times, alternating, and the ratios use medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_measure as measure  # noqa: E402 - the script's folder is on the path only now

MARK = "BENCH_RESULT "

SIZES = {  # model shape, data and steps per mode
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=2, mlp=768, vocab=0, max_length=512, docs=192,
                eval_docs=16, lr=1e-3, warmup=3, pairs=400, pair_words=32, dpo_steps=50, trl_dpo_steps=50,
                dpo_lr=1e-4),
    "gpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vocab=151936, max_length=1024, docs=320,
                eval_docs=32, lr=3e-4, warmup=5, pairs=400, pair_words=256, dpo_steps=50, trl_dpo_steps=20,
                dpo_lr=1e-6),
    "smoke": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=0, max_length=128, docs=48,
                  eval_docs=4, lr=1e-3, warmup=1, pairs=32, pair_words=16, dpo_steps=3, trl_dpo_steps=3,
                  dpo_lr=1e-4),
}
BATCH = 8


# ----------------------------------------------------------------------------------------------------------
# Shared artifacts: tokenizer, model, data (built once by the parent process).


WORDS = [c + v + d for c in "bcdfghjklmnprstvz" for v in "aeiou" for d in "bcdfgklmnprstxz"][:996]


def build_tokenizer():
    """A byte-level BPE whose merges make each of the 996 made-up words one token (after a space; a document's
    first word may take two). Built with `tokenizers`,
    saved, then reloaded with AutoTokenizer by everyone (transformers may rebuild it as the model type's
    tokenizer class, e.g. Qwen2Tokenizer): posttrain and TRL then tokenize with the very same object."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [" ".join(rng.sample(WORDS, 64)) for _ in range(400)]
    core.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tokenizer(work: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(work / "model")


def build(work: Path, size: dict, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    build_tokenizer().save_pretrained(work / "model")
    tok = tokenizer(work)
    sample = " ".join(WORDS[:50])
    if len(tok(sample)["input_ids"]) > 52 or tok(sample + tok.eos_token)["input_ids"][-1] != tok.eos_token_id:
        raise RuntimeError(f"the reloaded tokenizer ({type(tok).__name__}) does not give one token per word")
    cfg = Qwen2Config(vocab_size=max(size["vocab"], len(tok)), hidden_size=size["hidden"],
                      intermediate_size=size["mlp"],
                      num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                      num_key_value_heads=size["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(work / "model")
    rng = random.Random(seed)
    successors = {w: rng.sample(range(len(WORDS)), 4) for w in range(len(WORDS))}

    def words(n):
        out = [rng.randrange(len(WORDS))]
        while len(out) < n:
            out.append(rng.choice(successors[out[-1]]))
        return " ".join(WORDS[w] for w in out)

    top = size["max_length"] - 1  # room for EOS
    lengths = [rng.randint(top // 32, top) for _ in range(size["docs"] + size["eval_docs"])]
    texts = [words(n) for n in lengths]
    write_jsonl(work / "train.jsonl", [{"text": t} for t in texts[: size["docs"]]])
    write_jsonl(work / "eval.jsonl", [{"text": t} for t in texts[size["docs"]:]])
    half = size["pair_words"]
    pairs = [{"prompt": words(rng.randint(half // 2, half)), "chosen": " " + words(rng.randint(half // 2, half)),
              "rejected": " " + words(rng.randint(half // 2, half))} for _ in range(size["pairs"])]
    write_jsonl(work / "pairs.jsonl", pairs)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def token_ids(work: Path, name: str) -> list[list[int]]:
    """Documents tokenized as posttrain's text format does (EOS appended): both sides train on these ids."""
    tok = tokenizer(work)
    return [tok(row["text"] + tok.eos_token)["input_ids"] for row in read_jsonl(work / name)]


# ----------------------------------------------------------------------------------------------------------
# The variants.


# Exploration variants (--extra): posttrain with one setting changed, to see what a default would gain (the ones that
# need more than config keys are patched in by bench_train_explore.prepare).
EXTRA = {"posttrain_8k": ["train.tokens_per_step=8192"], "posttrain_ckpt": ["train.gradient_checkpointing=true"],
         "posttrain_liger": ["train.liger_kernels=true"], "posttrain_compile": ["train.compile=true"],
         "posttrain_cudagraphs": ["train.compile=true", "train.grad_accum=1",  # + full rows, CUDA graphs:
                                  "model.attn_implementation=sdpa"],  # bench_train_explore.py says why these
         "posttrain_profile": [],  # posttrain's defaults under torch.profiler (StepProfile)
         "posttrain_settle": ["train.max_steps=12"],  # the GPU's throwaway first run (see main), never compared
         "posttrain_model_loss": [],  # the model's own loss instead of TRL's fused head (bench_train_explore.py)
         "plain_loop": [], "plain_loop_8k": []}  # not posttrain: its rows in a bare loop (bench_train_explore.py)
EXTRA_TASKS = {"posttrain_compile": ("sft", "dpo"), "posttrain_ckpt": ("sft", "dpo"),
               "posttrain_profile": ("sft", "dpo")}  # the others: sft only


def posttrain_run(work: Path, size: dict, task: str, variant: str) -> tuple[dict, object]:
    import posttrain

    out_dir = work / f"{variant}-{task}"  # its own: variants may run at the same time (lockstep, rounds)
    common = [f"model.name_or_path={work / 'model'}", "data.eval=[]", "data.eval_fraction=0", "overwrite=true",
              f"output_dir={out_dir}", f"train.batch_size={BATCH}", "train.lr_scheduler=linear",
              "train.warmup_ratio=0", "train.logging_steps=1", "train.seed=42"]
    if task == "sft":
        extra = [f"data.train={work / 'train.jsonl'}", "data.format=text", f"train.learning_rate={size['lr']}",
                 f"train.max_length={size['max_length']}", "train.num_epochs=1"]
    else:
        extra = [f"data.train={work / 'pairs.jsonl'}", "data.format=preference", "recipe=dpo",
                 f"train.learning_rate={size['dpo_lr']}", f"train.max_length={3 * size['pair_words']}",
                 f"train.max_steps={size['dpo_steps']}"]
    config = work / f"{variant}-{task}.yaml"
    config.write_text("recipe: sft\nmodel: {name_or_path: x}\ndata: {train: x}\noutput_dir: x\n")
    metrics = posttrain.run(posttrain.load_config(config, common + extra + EXTRA.get(variant, [])))
    losses = [loss for _, loss in metrics["train_loss_history"]]
    return {"losses": losses, "speed": metrics.get("speed")}, out_dir


def trl_sft(work: Path, size: dict, variant: str) -> tuple[dict, object]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    docs = token_ids(work, "train.jsonl")
    tuned = {"trl_defaults": {}, "trl_no_ckpt": {"gradient_checkpointing": False},
             "trl_packed": {"gradient_checkpointing": False, "packing": True}}[variant]
    batch = BATCH
    if tuned.get("packing"):  # packed rows hold ~max_length tokens: as many rows as batch 8's tokens
        mean = sum(len(d) for d in docs) / len(docs)
        batch = max(1, round(BATCH * mean / size["max_length"]))
    args = SFTConfig(output_dir=str(work / variant), per_device_train_batch_size=batch, learning_rate=size["lr"],
                     max_length=size["max_length"], num_train_epochs=1, logging_steps=1, save_strategy="no",
                     report_to=[], seed=42, include_num_input_tokens_seen="non_padding", **measure.device_flags(),
                     **tuned)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": docs}),
                         processing_class=tokenizer(work))
    trainer.train()
    return {"losses": [log["loss"] for log in trainer.state.log_history if "loss" in log]}, trainer.model


def trl_dpo(work: Path, size: dict, variant: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tuned = {"trl_defaults": {}, "trl_no_ckpt": {"gradient_checkpointing": False}}[variant]
    args = DPOConfig(output_dir=str(work / variant), max_steps=size["trl_dpo_steps"], per_device_train_batch_size=BATCH,
                     learning_rate=size["dpo_lr"], max_length=3 * size["pair_words"], logging_steps=1,
                     save_strategy="no", report_to=[], seed=42, include_num_input_tokens_seen="non_padding",
                     **measure.device_flags(), **tuned)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype).eval()
    trainer = DPOTrainer(model=model, ref_model=reference, args=args,
                         train_dataset=Dataset.from_list(read_jsonl(work / "pairs.jsonl")),
                         processing_class=tokenizer(work))
    trainer.train()
    return {"losses": [log["loss"] for log in trainer.state.log_history if "loss" in log]}


def child(work: Path, mode: str, task: str, variant: str) -> dict:
    """One variant, in this process; returns its measurements."""
    import torch

    size = SIZES[mode]
    load_at_start = os.getloadavg()[0]  # the host's busyness: a host-bound step is as fast as its CPU
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if variant.startswith("plain_loop"):
        from bench_train_explore import plain_loop

        out, model = plain_loop(work, size, token_ids(work, "train.jsonl"), BATCH, tokenizer(work).pad_token_id,
                                tokens_per_step=8192 if variant == "plain_loop_8k" else 0)
        return {"task": task, "variant": variant, "loadavg_1m_at_start": load_at_start, **out,
                "held_out_loss": measure.held_out_loss(model, token_ids(work, "eval.jsonl")),
                "late_train_loss": measure.late_loss(out["losses"])}
    import bench_train_explore

    bench_train_explore.prepare(variant, size)  # the patches of exploration variants, in this process only
    clock = measure.Clock(size["warmup"], os.environ.get("BENCH_LOCK"))
    profile = measure.StepProfile(size["warmup"]) if variant == "posttrain_profile" else None
    marks = measure.instrument(clock, [profile.callback()] if profile else [])
    os.environ["POSTTRAIN_CACHE"] = str(work / "cache")  # cold reference cache: its pass counts as set-up
    clock.hold()  # set-up takes a turn too (held until the first step ends)
    start = time.perf_counter()
    ours = variant.startswith("posttrain")
    if task == "sft":
        out, trained = posttrain_run(work, size, task, variant) if ours else trl_sft(work, size, variant)
    else:
        out = posttrain_run(work, size, task, variant)[0] if ours else trl_dpo(work, size, variant)
    result = {"task": task, "variant": variant, "loadavg_1m_at_start": load_at_start,
              "setup_s": marks["train_start"] - start, **clock.result(BATCH),
              **measure.peak_memory(), "threads": torch.get_num_threads(), "trained_tokens": clock.tokens1, **out}
    if profile:
        result["profile"] = profile.summary
    if variant == "posttrain_cudagraphs":  # 0: every compiled pass really replayed as a graph
        result["cudagraph_skips"] = bench_train_explore.cudagraph_skips()
    if task == "sft":
        from transformers import AutoModelForCausalLM

        clock.hold()
        model = AutoModelForCausalLM.from_pretrained(trained) if isinstance(trained, Path) else trained
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        result["held_out_loss"] = measure.held_out_loss(model, token_ids(work, "eval.jsonl"))
        result["late_train_loss"] = measure.late_loss(out["losses"])
    return result


# ----------------------------------------------------------------------------------------------------------
# The parent: build once, run every variant in its own process, compare.


def run_variants(work: Path, mode: str, task: str, variants: list[str], lockstep: bool, threads: int,
                 on_result=None) -> list[dict]:
    """Each variant in its own process: one after the other, or all at once taking turns (see Clock);
    on_result(result) is called as each one finishes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if lockstep:
        env["BENCH_LOCK"] = str(work / f"{task}.lock")

    def start(variant):
        command = [sys.executable, __file__, "--child", variant, "--task", task, "--mode", mode, "--work", str(work),
                   "--threads", str(threads)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    running = [(v, start(v)) for v in variants] if lockstep else None
    results = []
    for i, variant in enumerate(variants):  # sequential: each starts after the last one ended and was recorded
        process = running[i][1] if running else start(variant)
        results.append(parse(task, variant, *process.communicate(), process.returncode))
        if on_result:
            on_result(results[-1])
    return results


def parse(task: str, variant: str, stdout: str, stderr: str, returncode: int) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(MARK)]
    if returncode or not lines:
        print(stdout[-3000:], stderr[-3000:], file=sys.stderr)
        lines = stderr.strip().splitlines()
        errors = [line for line in lines if re.match(r"^\w*(Error|Exception)\b", line)]  # not a progress bar
        return {"task": task, "variant": variant, "error": (errors or lines)[-1:]}
    result = json.loads(lines[-1][len(MARK):])
    print(f"  {task} {variant}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)),
          flush=True)
    return result


def compare(results: list[dict], task: str) -> dict:
    rate = "tokens_per_s" if task == "sft" else "pairs_per_s"
    rounds: dict[str, list[dict]] = {}
    for r in results:
        if r["task"] == task:
            rounds.setdefault(r["variant"], []).append(r)
    # A variant measured in several rounds (--rounds): its median rate, the rest (set-up with a cold reference
    # cache, losses) from its first round; a variant whose first round failed or measured nothing is left out.
    # Only rounds timed like the first one: on a CPU, runs in lockstep count step events, runs alone wall-clock.
    rounds = {name: [r for r in runs if "error" not in r and r.get(rate) and r.get("timing") == runs[0].get("timing")]
              for name, runs in rounds.items() if "error" not in runs[0] and runs[0].get(rate)}
    rows = {name: {**runs[0], rate: statistics.median(r[rate] for r in runs)} for name, runs in rounds.items()}
    ours, base = rows.get("posttrain"), rows.get("trl_defaults")
    if not (ours and base):
        return {}
    tuned = [r for name, r in rows.items() if name.startswith("trl_") and name != "trl_defaults"]
    out = {f"{rate}_vs_trl_defaults": ours[rate] / base[rate],
           "setup_vs_trl_defaults": ours["setup_s"] / base["setup_s"]}
    if tuned:
        best = max(tuned, key=lambda r: r[rate])
        out[f"{rate}_vs_best_trl_tuned ({best['variant']})"] = ours[rate] / best[rate]
    total = lambda r: r["setup_s"] + r["all_steps_s"]  # noqa: E731
    if ours["steps"] == base["steps"] or task == "sft":  # GPU DPO: TRL runs fewer steps (trl_dpo_steps)
        out["setup_plus_all_steps_vs_trl_defaults"] = total(base) / total(ours)  # > 1: posttrain done sooner
    for plain_name, mine_name in (("plain_loop", "posttrain"), ("plain_loop_8k", "posttrain_8k")):
        plain, mine = rows.get(plain_name), rows.get(mine_name)  # a bare loop on the same rows: the overhead
        if plain and mine and plain["timing"] == mine["timing"]:  # not in CPU lockstep (step events only)
            out[f"{rate}_{mine_name}_vs_{plain_name}"] = mine[rate] / plain[rate]
    if "posttrain_warm" in rows:
        out["setup_warm_cache_vs_trl_defaults"] = rows["posttrain_warm"]["setup_s"] / base["setup_s"]
    spread = {name: max(r[rate] for r in runs) / min(r[rate] for r in runs) for name, runs in rounds.items()
              if len(runs) > 1}
    others = {name: row[rate] / ours[rate] for name, row in rows.items()
              if name.startswith("posttrain_") and name not in ("posttrain_settle", "posttrain_warm",
                                                                  "posttrain_profile")}  # the profiler slows it
    if others:  # posttrain with one setting changed, over the defaults: what making it the default would gain
        out[f"{rate}_extra_vs_posttrain"] = others
    if spread:  # the same variant's fastest round over its slowest: how much the machine itself varied
        out[f"{rate}_round_spread"] = spread
    if task == "sft":
        out["held_out_loss_vs_trl_defaults"] = ours["held_out_loss"] / base["held_out_loss"]
        out["late_train_loss_vs_trl_defaults"] = ours["late_train_loss"] / base["late_train_loss"]
    else:
        steps = min(len(ours["losses"]), len(base["losses"]))
        out["max_abs_loss_diff_per_step"] = max(abs(a - b) for a, b in zip(ours["losses"][:steps], base["losses"]))
    return out


def print_table(results: list[dict]) -> None:
    columns = ["task", "variant", "tokens_per_s", "pairs_per_s", "setup_s", "peak_gib", "peak_rss_gib", "steps",
               "held_out_loss", "late_train_loss"]
    print("\n| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for r in results:
        cells = [r.get(c) for c in columns]
        print("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c if c is not None else "") for c in cells)
              + " |")


def arguments() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--task", choices=["sft", "dpo", "all"], default="all")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_train.json (default: $OUT)")
    parser.add_argument("--lockstep", choices=["auto", "on", "off"], default="auto",
                        help="run the variants at once, taking turns step by step (auto: on for CPU modes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per variant (default: 1 on CPU, torch's default on a GPU)")
    parser.add_argument("--extra", nargs="*", default=[], choices=sorted(set(EXTRA) - {"posttrain_settle"}),
                        help="also run these exploration variants (posttrain with one setting changed, or "
                             "plain_loop: the same rows in a bare PyTorch loop; "
                             "SFT, and DPO where EXTRA_TASKS says so)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="run only these of the standard variants (posttrain, trl_defaults, trl_no_ckpt, "
                             "trl_packed, posttrain_warm; default: all), e.g. to spend a short GPU call on what "
                             "matters; the ratios need posttrain and trl_defaults")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure posttrain and trl_defaults this many times, alternating, after the standard "
                             "variants (before --extra); the ratios use each one's median and report the spread "
                             "(a GPU host's speed drifts: two H200 runs of the same code differed by 1.4x)")
    parser.add_argument("--round-extra", nargs="*", default=[], choices=sorted(set(EXTRA) - {"posttrain_settle"}),
                        help="exploration variants that join every extra round too (measured --rounds times), e.g. "
                             "posttrain_compile: a default decided on medians, not on one run")
    parser.add_argument("--settle", choices=["auto", "on", "off"], default="auto",
                        help="a throwaway posttrain run of a few steps before the measured ones (auto: on a GPU, "
                             "where the first run after the machine starts measured up to 1.4x slower)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser, parser.parse_args()


def standard_plan(parser: argparse.ArgumentParser, chosen: list[str] | None) -> dict[str, list[str]]:
    """The standard variants per task, narrowed to --variants."""
    plan = {"sft": ["posttrain", "trl_defaults", "trl_no_ckpt", "trl_packed"],
            "dpo": ["posttrain", "trl_defaults", "trl_no_ckpt"], "dpo_warm": ["posttrain_warm"]}
    if chosen is None:
        return plan
    known = {v for variants in plan.values() for v in variants}
    if unknown := sorted(set(chosen) - known):
        parser.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(sorted(known))})")
    plan = {task: [v for v in variants if v in chosen] for task, variants in plan.items()}
    if plan["dpo_warm"] and "posttrain" not in chosen:
        parser.error("--variants: posttrain_warm reruns DPO on the cache posttrain's run fills; add posttrain")
    return plan


def main() -> int:
    parser, args = arguments()
    threads = args.threads if args.threads is not None else (0 if args.mode == "gpu" else 1)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if args.child:
        print(MARK + json.dumps(child(Path(args.work), args.mode, args.task, args.child)), flush=True)
        return 0
    import torch

    if args.mode == "gpu" and not torch.cuda.is_available():
        parser.error("--mode gpu needs a CUDA GPU")
    plan = standard_plan(parser, args.variants)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    build(work, SIZES[args.mode])
    tasks = ["sft", "dpo"] if args.task == "all" else [args.task]
    print(f"bench_train: mode {args.mode}, work dir {work}", flush=True)
    lockstep = args.mode != "gpu" if args.lockstep == "auto" else args.lockstep == "on"
    results: list[dict] = []

    def save(result=None, final=False):  # rewritten after every variant: a run stopped early keeps what it measured
        if result is not None:
            results.append(result)
        report = {"mode": args.mode, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "sizes": SIZES[args.mode], "complete": final, "results": results,
                  "ratios": {task: compare(results, task) for task in tasks}}
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "bench_train.json").write_text(json.dumps(report, indent=1))
        return report

    def run(task, variants, together=False):
        run_variants(work, args.mode, task, variants, together and lockstep, threads, save)

    if args.settle == "on" or (args.settle == "auto" and args.mode == "gpu"):
        run("sft", ["posttrain_settle"])
    for task in tasks:
        if plan[task]:
            run(task, plan[task], together=True)
    if "dpo" in tasks and plan["dpo_warm"]:  # after the first run filled the reference cache
        run("dpo", plan["dpo_warm"])
    for extra_round in range(1, args.rounds):  # alternating order, so that a drift of the machine hits all alike
        for task in tasks:
            pair = ["posttrain", "trl_defaults"]
            if all(v in plan[task] for v in pair):  # a repeat without the other one has nothing to compare with
                repeat = pair + [name for name in args.round_extra if task in EXTRA_TASKS.get(name, ("sft",))]
                run(task, repeat[::-1] if extra_round % 2 else repeat, together=True)
    for task in tasks:  # last: the comparisons above come first when time is short
        extra = [name for name in dict.fromkeys(args.extra + args.round_extra)
                 if task in EXTRA_TASKS.get(name, ("sft",))]
        if extra:
            run(task, extra)
    print_table(results)
    report = save(final=True)
    print("\nratios (posttrain / TRL):\n" + json.dumps(report["ratios"], indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
