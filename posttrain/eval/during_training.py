"""Evaluation during training: an eval suite scored on the model being trained, every N optimizer steps.

    evaluate:
      suite: ../eval/tiny-train.yaml   # generation, multiple_choice and perplexity sections only
      every_steps: 50                  # and at the last step
      limit: 200                       # first N items of each task; null: the suite's own limits

The suite's data is read and checked once, before the run folder is touched (a typo costs no output). At each
scored step the figures go three ways, all through the Trainer's own logging so that nothing is kept twice:

- state.log_history, as `eval_<key>` (e.g. `eval_gen/add/exact_match`). Checkpoints save that history and
  --resume restores it, so metrics.json's `eval_history` (eval_history() below) holds the whole run's curve.
- the tracker of train.report_to: transformers' integrations file every `eval_` key under `eval/`
  (integration_utils.rewrite_logs), so TensorBoard shows `eval/gen/add/exact_match` next to `eval/loss`.
- one `posttrain: step N: ...` line.

What runs where. The scorers are posttrain eval's own (posttrain.eval.runner.SuiteRun), so a figure at the last
step equals `posttrain eval` of the saved model on the same suite and limit. The model is scored as it trains:
on its device, in its dtype (the suite's device and dtype do not apply), in eval mode (no dropout), then put
back in training mode; the random number generators are restored afterwards, so that a run with evaluation
trains exactly like one without. Sections that need a second model (preference's reference, drift's base) or
lm-eval are refused at setup: holding another model through training costs its memory for the whole run.
Under DDP (and ZeRO-1/2) every process holds the whole model: the main process scores the unwrapped model while
the others wait for its figures (the wait counts against the process group's timeout, 30 minutes by default:
keep `limit` small). FSDP and ZeRO-3 shard the parameters, so no process holds the model; they are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback

from posttrain import log
from posttrain.engine.distributed import on_main_then_shared
from posttrain.errors import PosttrainError
from posttrain.eval import metric_catalog as cat
from posttrain.eval.runner import SuiteRun
from posttrain.eval.suite import Suite, load_suite

FAMILIES = ("gen", "mc", "perplexity")  # the metric families of the sections that run during training
PREFIX = "eval_"  # trackers file `eval_*` under eval/; the Trainer's own held-out figures use it too
REFUSED = {
    "preference": "needs a reference model",
    "drift": "needs a base model",
    "lm_eval": "runs lm-eval's harness",
}


@dataclass
class TrainingModel:
    """The model being trained, shaped like the loaded variants SuiteRun.evaluate scores."""

    name: str
    model: torch.nn.Module
    tokenizer: object

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def during_training(cfg) -> EvalDuringTraining | None:
    """The callback for cfg.evaluate (None without the section). Every process calls it; the suite is read and
    checked on the main process only, and a bad one fails on every process with the same line."""
    section = cfg.evaluate
    if section is None:
        return None
    check_unsharded()
    read: dict = {}

    def read_suite() -> None:
        read["run"] = SuiteRun(training_suite(section.suite, section.limit))

    on_main_then_shared(read_suite)
    return EvalDuringTraining(read.get("run"), section.every_steps)


def check_unsharded() -> None:
    """FSDP and DeepSpeed ZeRO-3 keep no whole model on any process: refused, from accelerate launch's settings."""
    env = os.environ
    sharded = ("FSDP" if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" else
               "DeepSpeed ZeRO-3" if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
               and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3") == "3" else None)
    if sharded:
        raise PosttrainError(f"evaluate: not supported under {sharded}, which shards the model across processes; "
                             "train with DDP or ZeRO-2 (--accelerate-config ddp or zero2), or remove the evaluate "
                             "section and run posttrain eval on the finished model")


def training_suite(path: str, limit: int | None) -> Suite:
    """The suite at path, checked for sections that run during training, with every task capped at limit."""
    suite = load_suite(path)
    for key, reason in REFUSED.items():
        if getattr(suite, key) is not None:
            raise PosttrainError(
                f"evaluate.suite: {suite.source} has a {key} section, which {reason}; only generation, "
                "multiple_choice and perplexity run during training: remove it from the suite (or name another "
                "suite) and score it after training with posttrain eval")
    if not (suite.generation or suite.multiple_choice or suite.perplexity):
        raise PosttrainError(f"evaluate.suite: {suite.source} has no generation, multiple_choice or perplexity "
                             "section; add one (see docs/EVAL.md)")
    if limit is not None:
        for _, section in suite.sections():
            section.limit = limit if section.limit is None else min(section.limit, limit)
    return suite


class EvalDuringTraining(TrainerCallback):
    """Scores the suite at every every_steps-th optimizer step and at the last one; bind(trainer) before training."""

    def __init__(self, suite_run: SuiteRun | None, every_steps: int):
        self.suite_run = suite_run  # None on the processes other than the main one
        self.every_steps = every_steps
        self.trainer = None

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps == 0 or state.global_step >= state.max_steps:
            self.score(state, control)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # A run that ends before max_steps (the data ran out) still gets its final figures.
        if state.global_step and state.global_step not in {e["step"] for e in eval_history(state.log_history)}:
            self.score(state, control)
        return control

    def score(self, state, control) -> None:
        if getattr(self.trainer, "stop_agreed", False):
            return  # a stop request's grace period belongs to the checkpoint
        figures = on_main_then_shared(self._evaluate, state.global_step)
        # transformers' Trainer.log, not the TRL subclass's: that one would add (and reset) the training metrics
        # TRL averages for its next training log line. Logging clears control.should_log, which this step's own
        # training log line (the loss) still needs.
        should_log = control.should_log
        Trainer.log(self.trainer, {PREFIX + key: value for key, value in figures.items()})
        control.should_log = should_log
        log.info(f"step {state.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))

    def _evaluate(self, step: int) -> dict[str, float]:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = model.training
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        model.eval()
        try:
            # no_grad rather than inference_mode here: a tensor a module caches while scoring must stay usable
            # by the next training step's backward (the scorers use inference_mode where nothing is cached).
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                figures = self.suite_run.evaluate(TrainingModel(f"step {step}", model, self.trainer.processing_class))
        finally:
            model.train(was_training)
        return {key: float(value) for key, value in figures.items() if value is not None and not cat.is_stderr(key)}


def eval_history(log_history: list[dict]) -> list[dict]:
    """[{"step": N, "<key as the eval table names it>": value, ...}, ...] from the Trainer's log history."""
    history = []
    for entry in log_history:
        figures = {key[len(PREFIX):]: value for key, value in entry.items()
                   if key.startswith(PREFIX) and cat.family(key[len(PREFIX):]) in FAMILIES and "/" in key}
        if figures:
            history.append({"step": entry["step"], **figures})
    return history
