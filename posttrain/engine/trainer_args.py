"""From posttrain's typed config to TRL's trainer arguments, and what a finished run reports.

One mapping, in one place, shared by every recipe: the recipes add only their objective's own arguments.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import platform
import time
from pathlib import Path

from transformers import TrainerCallback

from posttrain import log
from posttrain.config.schema import Config
from posttrain.engine.model_card import versions
from posttrain.engine.plan import fixed_plan, precision_flags
from posttrain.engine.run_dir import CHECKPOINTS
from posttrain.errors import PosttrainError


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"


def transfer_flags() -> dict:
    """On CUDA, batches are pinned (the Trainer's default) and copied without making the host wait for the GPU's
    queued work (a blocking copy would wait for the previous step's optimizer before the next forward is queued)."""
    import torch

    return {"accelerator_config": {"non_blocking": True}} if torch.cuda.is_available() else {}


def checkpointing_flag(args_class, enabled: bool) -> dict:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; accept both."""
    names = {f.name for f in dataclasses.fields(args_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


REPORTER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def trainer_args(cfg: Config, args_class, run_dir: Path, has_eval: bool, plan=None, **recipe_args):
    """TRL SFTConfig / DPOConfig (args_class) from the typed config; `plan` (posttrain.engine.plan.SpeedPlan) holds the
    resolved micro-batch, accumulation, checkpointing, optimizer and kernels (without one: the config's values)."""
    train = cfg.train
    plan = plan or fixed_plan(train)
    package = REPORTER_PACKAGES.get(train.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise PosttrainError(f"train.report_to: {train.report_to} needs the {package} package: pip install {package}")
    return args_class(
        output_dir=str(run_dir / CHECKPOINTS),
        max_steps=train.max_steps,
        num_train_epochs=train.num_epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        per_device_eval_batch_size=train.batch_size,  # evaluation stays unpacked: examples (pairs) per batch
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps or None,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=train.save_total_limit or None,
        report_to=[] if train.report_to == "none" else [train.report_to],
        include_num_input_tokens_seen="non_padding",  # counted right after the forward (checkpoints.py)
        # The filter reads the loss after the backward, and the loss guard stops a non-finite run before it matters.
        # Off, a non-finite evaluation batch also makes eval_loss NaN instead of being dropped: shown, not hidden.
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient: skip DDP's extra graph walk
        dataloader_drop_last=False,
        disable_tqdm=True if log.quiet() else None,  # --quiet: no progress bar
        **precision_flags(train.precision),
        **transfer_flags(),
        **plan.trainer_kwargs(),
        **checkpointing_flag(args_class, plan.gradient_checkpointing),
        # GRPO/RLOO take no max_length: their recipe keeps only the prompts that leave room for a completion.
        **({"max_length": train.max_length} if "max_length" in {f.name for f in dataclasses.fields(args_class)}
           else {}),
        **recipe_args,
    )


class LossHistory(TrainerCallback):
    """Keeps every logged training loss (and step), for metrics.json and the loss-fell checks."""

    def __init__(self):
        self.losses: list[tuple[int, float]] = []
        self.started = time.perf_counter()
        self.tokens_at_start = 0  # a resumed run counts its throughput from where it resumed

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_at_start = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


def run_metrics(trainer, train_output, history: LossHistory, data_counts: dict, extra: dict) -> dict:
    """metrics.json: losses, tokens (non-padding inputs), throughput over the training loop, versions."""
    state = trainer.state
    runtime = time.perf_counter() - history.started
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    train_runtime = float(train_output.metrics.get("train_runtime", runtime))
    # The Trainer's log history, restored from the checkpoint on --resume, holds the whole run's losses.
    losses = [(log["step"], float(log["loss"])) for log in state.log_history if "loss" in log] or history.losses
    return {
        "train_loss_first": losses[0][1] if losses else None,
        "train_loss_last": losses[-1][1] if losses else None,
        "train_loss_history": losses,
        "steps": state.global_step,
        "world_size": trainer.args.world_size,
        "trained_tokens": tokens,
        "tokens_per_second": (tokens - history.tokens_at_start) / train_runtime if train_runtime else None,
        "train_runtime_s": train_runtime,
        "runtime_s": runtime,
        "data": data_counts,
        **extra,
        "device": device_name(),
        "versions": versions(),
    }
