"""Supervised fine-tuning: full, LoRA or QLoRA (the `adapter` section decides), on TRL's SFTTrainer.

Read top to bottom; every step is a call into posttrain or TRL. The run writes, in output_dir:
posttrain.yaml first, then the model (or adapter) with tokenizer and chat template, README.md, and
metrics.json last (the marker that the run finished).
"""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from posttrain.config import Config
from posttrain.masks import sft_examples
from posttrain.models import load_model, load_tokenizer, lora_config, resolve_path
from posttrain.outputs import finish_run, prepare_run_dir
from posttrain.training import LossHistory, model_card, run_metrics, trainer_args


def main(cfg: Config) -> dict:
    # 1. Data: read, normalize and tokenize with posttrain's loss masks (assistant turns + end-of-turn token
    #    for chat rows, the completion for prompt/completion rows, everything for text). TRL then takes the
    #    ready `labels` as they are, so the mask is ours for any chat template.
    resolved = resolve_path(cfg.model.name_or_path, cfg.model.allow_pickle)
    tokenizer = load_tokenizer(cfg.model, resolved)
    train_set, eval_set, data_counts = sft_examples(cfg, tokenizer)
    print(f"posttrain: {len(train_set.examples)} training rows ({data_counts})")

    # 2. The output folder, only once the data is good: refuse to clobber a finished run (unless overwrite,
    #    and even then the old run is kept aside until this one finishes); the resolved config goes in first.
    run_dir = prepare_run_dir(cfg)

    # 3. Model: full precision or 4-bit (QLoRA); TRL wraps it with the LoRA adapter when one is configured.
    model = load_model(cfg.model, resolved, tokenizer, cfg.adapter)

    # 4. Train.
    history = LossHistory()
    trainer = SFTTrainer(
        model=model,
        args=trainer_args(cfg, SFTConfig, run_dir, eval_set is not None, packing=cfg.train.packing),
        train_dataset=Dataset.from_list(train_set.examples),
        eval_dataset=Dataset.from_list(eval_set.examples) if eval_set else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.adapter, model),
        callbacks=[history],
    )
    train_output = trainer.train()
    final_eval = trainer.evaluate() if eval_set else {}

    # 5. Outputs: model or adapter + tokenizer (with its chat template) + card, then metrics.json last.
    metrics = run_metrics(trainer, train_output, history, data_counts, {"eval_loss": final_eval.get("eval_loss")})

    def save(folder):
        trainer.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    title = f"Supervised fine-tuning ({cfg.adapter.method if cfg.adapter else 'full'})"
    finish_run(run_dir, save, metrics, model_card(cfg, metrics, cfg.adapter is not None, title))
    return metrics
