"""The skeleton every recipe runs through, top to bottom; a recipe (recipes/*.py) fills in only its objective.

    1. tokenizer, then the data: read, normalized and tokenized once, on the main process (Recipe.examples)
    2. the run folder, only once the data is good (a bad row never costs the folder's previous run)
    3. the model and everything the trainer needs for this objective (Recipe.setup)
    4. the trainer: TRL's, with posttrain's guards (atomic checkpoints, --resume, NaN and SIGTERM stops)
    5. train, evaluate (and, with an `evaluate:` section, score an eval suite every N steps while training:
       posttrain.eval.during_training)
    6. save on every process (FSDP and ZeRO-3 gather the weights collectively; the main process writes),
       then the model card and metrics.json, last

Why one skeleton: each step above is the same for every objective, and copies drift (one copy that returns early
on the non-main processes never gathers sharded weights). A recipe is a subclass of Recipe whose methods read in
the order they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import PrinterCallback

from posttrain import log
from posttrain.config.schema import Config
from posttrain.engine.checkpoints import guarded, train
from posttrain.engine.distributed import on_main_then_shared
from posttrain.engine.model_card import model_card
from posttrain.engine.plan import sft_inputs
from posttrain.engine.run_dir import finish_run, prepare_run_dir
from posttrain.engine.trainer_args import LossHistory, run_metrics, trainer_args
from posttrain.eval.during_training import during_training, eval_history
from posttrain.files import check_writable
from posttrain.models import (
    absolute_adapter_base,
    load_tokenizer,
    lora_config,
    record_ternary_adapter,
    resolve_path,
)


@dataclass
class Data:
    """What Recipe.examples returns: tokenized train and eval sets and the counts for metrics.json."""

    train: object
    eval: object | None
    counts: dict


@dataclass
class Setup:
    """What Recipe.setup returns: the model and what the trainer is built with for this objective."""

    model: object
    plan: object  # posttrain.engine.plan.SpeedPlan
    train_dataset: object
    eval_dataset: object | None
    data_collator: object | None = None
    speed: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)
    trainer_kwargs: dict = field(default_factory=dict)  # e.g. DPO's ref_model
    args: dict = field(default_factory=dict)  # the objective's own TRL config arguments
    state: dict = field(default_factory=dict)  # anything the recipe's later steps need


@dataclass
class Run:
    """One run's shared state, handed to every step of the recipe."""

    cfg: Config
    model_path: str  # cfg.model.name_or_path resolved to a folder (or hub name)
    tokenizer: object
    data: Data
    folder: Path


class Recipe:
    """One training objective; the skeleton (`run`) calls its methods in this order."""

    trainer_class: type  # TRL's trainer (SFTTrainer, DPOTrainer, ...)
    args_class: type  # its config class (SFTConfig, DPOConfig, ...)
    trains_adapters = True  # an `adapter:` section wraps the model in LoRA/QLoRA

    def examples(self, cfg: Config, tokenizer) -> Data:
        """Read, normalize and tokenize the data (runs once, on the main process; the result is shared)."""
        raise NotImplementedError

    def setup(self, run: Run) -> Setup:
        """Load the model and prepare it and the datasets for this objective."""
        raise NotImplementedError

    def after_build(self, trainer, run: Run, setup: Setup) -> dict:
        """Work between building the trainer and training it; returns metrics for metrics.json."""
        return {}

    def metrics(self, trainer, run: Run, setup: Setup, final_eval: dict) -> dict:
        """The objective's own entries in metrics.json."""
        return {"eval_loss": final_eval.get("eval_loss")}

    def save(self, trainer, run: Run, setup: Setup, folder: Path, metrics: dict) -> None:
        """Write the final model into folder. Runs on every process; only the main one writes."""
        trainer.save_model(str(folder))  # model or adapter, and the tokenizer with its chat template
        if trainer.args.should_save:  # an adapter names its base by an absolute path: it loads from any folder
            absolute_adapter_base(folder)
            record_ternary_adapter(folder, run.cfg.adapter, run.model_path)  # LoRA on a packed ternary base

    def title(self, cfg: Config) -> str:
        raise NotImplementedError


def sft_setup(run: Run, model, callbacks=()) -> Setup:
    """Documents packed into rows of max_length that never attend to each other (no padding), the speed plan
    (micro-batch, accumulation, checkpointing, optimizer, kernels; each printed); evaluation stays unpacked."""
    inputs = sft_inputs(run.cfg, model, run.tokenizer, run.data.train, run.data.eval)
    return Setup(model=model, plan=inputs.plan, train_dataset=inputs.train_dataset,
                 eval_dataset=inputs.eval_dataset, data_collator=inputs.data_collator, speed=inputs.speed,
                 callbacks=list(callbacks),
                 args={"dataset_kwargs": {"skip_prepare_dataset": True}})  # tokenized, masked, truncated: ours


def build_trainer(recipe: Recipe, run: Run, setup: Setup, history: LossHistory):
    cfg = run.cfg
    trainer = guarded(recipe.trainer_class)(
        model=setup.model,
        args=trainer_args(cfg, recipe.args_class, run.folder, setup.eval_dataset is not None, setup.plan,
                          **setup.args),
        data_collator=setup.data_collator,
        train_dataset=setup.train_dataset,
        eval_dataset=setup.eval_dataset,
        processing_class=run.tokenizer,
        peft_config=lora_config(cfg.adapter, setup.model) if recipe.trains_adapters else None,
        callbacks=[history, *setup.callbacks],
        **setup.trainer_kwargs,
    )
    if log.quiet():  # without a progress bar the Trainer prints every log line instead
        trainer.remove_callback(PrinterCallback)
    return trainer


def run_recipe(recipe: Recipe, cfg: Config, resume: bool = False) -> dict:
    """Run one recipe on one config; returns the metrics that are also written to output_dir/metrics.json."""
    # 0. An output_dir that can never be written fails now, not after the data has been loaded.
    check_writable(cfg.output_dir, "output_dir")
    scoring = during_training(cfg)  # the evaluate section's suite, read and checked before the data

    # 1. Tokenizer and data, once for the whole launch.
    model_path = resolve_path(cfg.model.name_or_path, cfg.model.allow_pickle)
    tokenizer = load_tokenizer(cfg.model, model_path)
    data = on_main_then_shared(recipe.examples, cfg, tokenizer)
    once = f"; read once, on the main process, for all {log.world_size()} processes" if log.world_size() > 1 else ""
    log.info(f"data: {data.counts}{once}")

    # 2. The run folder: refuses to clobber a finished run; the resolved config goes in first.
    run = Run(cfg, model_path, tokenizer, data, prepare_run_dir(cfg, resume))

    # 3-4. The objective's model and inputs, then the guarded trainer.
    setup = recipe.setup(run)
    setup.callbacks += [scoring] if scoring else []
    history = LossHistory()
    trainer = build_trainer(recipe, run, setup, history)
    if scoring:
        scoring.bind(trainer)
    extra = recipe.after_build(trainer, run, setup)

    # 5. Train (continuing from the latest complete checkpoint when the run folder kept one), then evaluate.
    train_output = train(trainer)
    final_eval = trainer.evaluate() if setup.eval_dataset is not None else {}

    # 6. Outputs: the model on every process, then the card and metrics.json last.
    extra.update(recipe.metrics(trainer, run, setup, final_eval), speed=setup.speed,
                 eval_history=eval_history(trainer.state.log_history))  # from checkpoints too, on --resume
    metrics = run_metrics(trainer, train_output, history, data.counts, extra)
    card = model_card(cfg, metrics, cfg.adapter is not None and recipe.trains_adapters, recipe.title(cfg))
    finish_run(run.folder, lambda folder: recipe.save(trainer, run, setup, folder, metrics), metrics, card)
    return metrics
