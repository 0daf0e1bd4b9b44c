"""posttrain's GRPO against TRL's GRPOTrainer with TRL's defaults, in one run: speed, and the reward it reaches.

    posttrain demo                                          # makes runs/demo/sft, a model that sometimes adds right
    python scripts/bench_grpo.py --model runs/demo/sft       # configs/demo/grpo.yaml's settings, 60 steps, 2 rounds
    python scripts/bench_grpo.py --config configs/qwen2.5-0.5b/grpo.yaml --model Qwen/Qwen2.5-0.5B-Instruct \\
        --steps 10 --rounds 1                               # a real model (a GPU, and the `rl` extra)

Both sides train the same starting model on the same prompt rows (posttrain's data layer prepares them once),
with the same reward functions (the config's), generation settings (num_generations, max_completion_length,
temperature, top_p), completions per step, optimizer settings (learning rate, schedule, warm-up, steps, seed),
beta, loss type and clipping epsilon: posttrain runs its recipe, and TRL's GRPOTrainer gets those values read off
posttrain's trainer. Everything else is each side's default: TRL's GRPOConfig turns activation checkpointing on
(`--trl-arg gradient_checkpointing=false` times TRL without it) and samples with `model.generate`, rendering the
chat template for every copy of a prompt; posttrain turns
checkpointing on only when the step would not fit (posttrain/engine/plan.py) and samples with its own decode loop
(posttrain/eval/sampling.py; each prompt rendered and prefilled once).

Timed, per run: the training loop (Trainer.train), inside it the sampling (`_generate_single_turn`) and the rest
of making a batch (prompt tokenization, decoding, rewards, advantages: `_generate_and_score_completions` less the
sampling); the policy update is the loop's time less both (forward, backward, optimizer, logging). Rounds
alternate which side runs first; on a GPU an uncounted posttrain run settles the process first (its first CUDA
work loads and tunes kernels). Printed: one JSON line per run, then the medians, `speedup` (TRL's seconds per
step / posttrain's) and each side's mean reward over the first and the last 10 steps (one log line per 10 steps):
with the same seed both draw the same completions from the same distribution, so the rewards match until the two
sides' float rounding parts.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SHARED_ARGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
               "warmup_steps", "max_steps", "seed", "weight_decay", "max_grad_norm", "num_generations",
               "max_completion_length", "temperature", "top_p", "beta", "loss_type", "epsilon", "reward_weights",
               "use_cpu", "bf16", "fp16", "disable_dropout")


class Clock:
    """Seconds in the training loop, in sampling and in the rest of batch-making; completion tokens sampled; the
    trainer that ran."""

    def __init__(self):
        self.train = self.sampling = self.batch = 0.0
        self.completion_tokens = 0
        self.trainer = None

    def wrap(self, owner, trainer_class):
        """Time `owner`'s (a trainer or a trainer class) three methods, whose originals are trainer_class's."""
        def timed(name, field):
            original = getattr(trainer_class, name)

            def method(trainer, *args, **kwargs):
                self.trainer = trainer
                start = time.perf_counter()
                result = original(trainer, *args, **kwargs)
                setattr(self, field, getattr(self, field) + time.perf_counter() - start)
                if name == "_generate_single_turn":
                    ids = result[0] if isinstance(result, tuple) else result
                    self.completion_tokens += sum(len(row) for row in ids)
                return result
            return method

        for name, field in (("train", "train"), ("_generate_single_turn", "sampling"),
                            ("_generate_and_score_completions", "batch")):
            method = timed(name, field)
            setattr(owner, name, method.__get__(owner) if not isinstance(owner, type) else method)

    def row(self, side: str, steps: int, log_history: list[dict]) -> dict:
        # every 10th step's line (posttrain logs step 1 as well): each the mean of its 10 steps
        rewards = [entry["reward"] for entry in log_history if "reward" in entry and entry["step"] % 10 == 0]
        making = self.batch - self.sampling
        return {"side": side, "steps": steps, "train_s": round(self.train, 3),
                "steps_per_s": round(steps / self.train, 3),
                "completion_tokens_per_s": round(self.completion_tokens / self.train, 1),
                "sampling_s": round(self.sampling, 3), "batch_making_s": round(making, 3),
                "update_s": round(self.train - self.batch, 3),
                "reward_first10": round(rewards[0], 4) if rewards else None,
                "reward_last10": round(rewards[-1], 4) if rewards else None}


def posttrain_run(config: str, overrides: list[str], out: Path) -> tuple[dict, dict]:
    """(the timing row, the arguments TRL gets: posttrain's values of SHARED_ARGS, model dtype and data)."""
    from posttrain.config.schema import load_config
    from posttrain.registry import load_recipe

    cfg = load_config(config, [*overrides, f"output_dir={out}", "overwrite=true"])
    if cfg.adapter is not None or cfg.rl.ternary:
        raise SystemExit(f"{config}: bench_grpo compares full fine-tuning of a dense model (TRL's side gets no "
                         "adapter and no BitLinear); remove adapter: and rl.ternary")
    grpo = load_recipe("grpo")  # a fresh module each call: the class patched here is the one the run uses
    trainer_class = grpo.TRAINERS[cfg.rl.algorithm][0]
    clock = Clock()
    clock.wrap(trainer_class, trainer_class.__mro__[1])
    grpo.main(cfg)
    trainer = clock.trainer
    shared = {name: getattr(trainer.args, name) for name in SHARED_ARGS}
    context = {"args": shared, "model_path": trainer.model.name_or_path,
               "dtype": next(trainer.model.parameters()).dtype, "train_dataset": trainer.train_dataset,
               "reward_funcs": trainer.reward_funcs}
    return clock.row("posttrain", trainer.state.global_step, trainer.state.log_history), context


def trl_run(context: dict, out: Path, trl_args: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(context["model_path"])
    model = AutoModelForCausalLM.from_pretrained(context["model_path"], dtype=context["dtype"])
    args = GRPOConfig(output_dir=str(out), report_to=[], save_strategy="no", logging_steps=10,
                      **{**context["args"], **trl_args})
    trainer = GRPOTrainer(model=model, reward_funcs=context["reward_funcs"], args=args,
                          train_dataset=context["train_dataset"], processing_class=tokenizer)
    clock = Clock()
    clock.wrap(trainer, GRPOTrainer)
    trainer.train()
    return clock.row("trl", trainer.state.global_step, trainer.state.log_history)


def random_qwen_shaped_model(folder: Path) -> str:
    """A randomly initialized model of Qwen2.5-0.5B's shape (24 layers, 896 wide, 14 heads, 2 KV heads) with the
    tiny tokenizer, for timing without a download: it never answers right (reward 0), and its completions rarely
    stop early, so every step samples the full completion length."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from posttrain.tiny import resolve_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_tiny_model("tiny:llama"))
    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def summary(rows: list[dict]) -> dict:
    def median(side, key):
        values = [r[key] for r in rows if r["side"] == side and r[key] is not None]
        return statistics.median(values) if values else None

    result = {"rounds": len(rows) // 2}
    for key in ("steps_per_s", "completion_tokens_per_s", "sampling_s", "batch_making_s", "update_s",
                "reward_first10", "reward_last10"):
        result[f"posttrain_{key}"], result[f"trl_{key}"] = median("posttrain", key), median("trl", key)
    result["speedup"] = round(result["posttrain_steps_per_s"] / result["trl_steps_per_s"], 3)
    return result


def release():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo" / "grpo.yaml"))
    p.add_argument("--model", default="runs/demo/sft", help="the starting model (a folder or a hub name)")
    p.add_argument("--random-qwen2.5-0.5b-shape", dest="random_shape", action="store_true",
                   help="time a random model of Qwen2.5-0.5B's shape instead (built in the output folder)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--settle-steps", type=int, default=None,
                   help="a first, uncounted posttrain run of this many steps (default 10 on a GPU, 0 on a CPU): the "
                        "process's first CUDA work pays for kernel loading and autotuning")
    p.add_argument("--trl-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a GRPOConfig argument for TRL's side, e.g. gradient_checkpointing=false to time TRL without "
                        "its default activation checkpointing (a YAML value)")
    p.add_argument("--out", default=None, help="folder for the runs' outputs (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as scratch:
        out = Path(args.out or scratch)
        model = random_qwen_shaped_model(out / "random-model") if args.random_shape else args.model
        result = bench(args, model, out)
    print(json.dumps(result), flush=True)
    return result


def bench(args, model: str, out: Path) -> dict:
    overrides = [f"model.name_or_path={model}", f"train.max_steps={args.steps}", "train.logging_steps=10",
                 "train.eval_steps=0", "train.save_steps=0", "evaluate=null", "data.eval=[]", "data.eval_fraction=0",
                 *args.set]
    import yaml

    trl_args = {name: yaml.safe_load(value) for name, value in (arg.split("=", 1) for arg in args.trl_arg)}
    settle = args.settle_steps
    if settle is None:
        import torch

        settle = 10 if torch.cuda.is_available() else 0
    if settle:
        posttrain_run(args.config, [*overrides, f"train.max_steps={settle}"], out / "settle")
        release()
    rows, context = [], None
    for round_ in range(args.rounds):
        for side in (("posttrain", "trl") if round_ % 2 == 0 else ("trl", "posttrain")):
            if side == "posttrain":
                row, context = posttrain_run(args.config, overrides, out / "posttrain")
            else:
                row = trl_run(context, out / "trl", trl_args)
            rows.append(row)
            release()
            print(json.dumps(rows[-1]), flush=True)
    return summary(rows)


if __name__ == "__main__":
    main()
