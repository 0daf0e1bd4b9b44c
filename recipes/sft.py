"""Supervised fine-tuning: full, LoRA or QLoRA (the `adapter` section decides), on TRL's SFTTrainer.

Read top to bottom; every step is a call into posttrain or TRL. The run writes, in output_dir:
posttrain.yaml first, then the model (or adapter) with tokenizer and chat template, README.md, and
metrics.json last (the marker that the run finished).
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from posttrain.checkpoints import guarded, train
from posttrain.config import Config
from posttrain.masks import sft_examples
from posttrain.models import load_model, load_tokenizer, lora_config, resolve_path
from posttrain.outputs import finish_run, prepare_run_dir
from posttrain.packing import prepare_model, sft_inputs
from posttrain.ranks import on_main_then_shared
from posttrain.speed import fastest_attention
from posttrain.training import LossHistory, model_card, run_metrics, trainer_args


def main(cfg: Config, resume: bool = False) -> dict:
    # 1. Data: read, normalize and tokenize with posttrain's loss masks (assistant turns + end-of-turn token
    #    for chat rows, the completion for prompt/completion rows, everything for text). TRL then takes the
    #    ready `labels` as they are, so the mask is ours for any chat template.
    resolved = resolve_path(cfg.model.name_or_path, cfg.model.allow_pickle)
    tokenizer = load_tokenizer(cfg.model, resolved)
    train_set, eval_set, data_counts = on_main_then_shared(sft_examples, cfg, tokenizer)  # once, not per rank
    print(f"posttrain: {len(train_set.examples)} training rows ({data_counts})")

    # 2. The output folder, only once the data is good: refuse to clobber a finished run (unless overwrite,
    #    and even then the old run is kept aside until this one finishes); the resolved config goes in first.
    run_dir = prepare_run_dir(cfg, resume)

    # 3. Model: full precision or 4-bit (QLoRA); TRL wraps it with the LoRA adapter when one is configured.
    #    Attention: flash-attn when installed, else sdpa; training never uses the KV cache (see packing.py).
    model = load_model(fastest_attention(cfg.model), resolved, tokenizer, cfg.adapter)
    prepare_model(model)

    # 4. Speed: the documents packed into rows of max_length that never attend to each other (no padding), then
    #    micro-batch, accumulation, checkpointing, optimizer and kernels chosen for this machine, each printed.
    inputs = sft_inputs(cfg, model, tokenizer, train_set, eval_set)

    # 5. Train (evaluation stays unpacked, so eval_loss means what it means without packing).
    history = LossHistory()
    trainer = guarded(SFTTrainer)(
        model=model,
        args=trainer_args(cfg, SFTConfig, run_dir, eval_set is not None, inputs.plan,
                          dataset_kwargs={"skip_prepare_dataset": True}),  # tokenized, masked, truncated: ours
        data_collator=inputs.data_collator,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.adapter, model),
        callbacks=[history],
    )
    train_output = train(trainer, resume)  # atomic checkpoints, --resume, NaN/SIGTERM guards
    final_eval = trainer.evaluate() if eval_set else {}

    # 6. Outputs: model or adapter + tokenizer (with its chat template) + card, then metrics.json last.
    metrics = run_metrics(trainer, train_output, history, data_counts,
                          {"eval_loss": final_eval.get("eval_loss"), "speed": inputs.speed})

    def save(folder):  # on every process: FSDP/ZeRO-3 gather the weights; the main process writes
        trainer.save_model(str(folder))  # model or adapter, and the tokenizer with its chat template

    title = f"Supervised fine-tuning ({cfg.adapter.method if cfg.adapter else 'full'})"
    finish_run(run_dir, save, metrics, model_card(cfg, metrics, cfg.adapter is not None, title))
    return metrics
