"""Direct preference optimization on TRL's DPOTrainer, with a cheap, cached reference.

Starts from anything posttrain loads: a hub model, a full SFT output, or an SFT LoRA adapter (merged in
first). The reference model is the starting model unless dpo.ref_model names another:
- dpo.precompute_ref (default): reference log-probs are computed once, before training, and cached on disk
  keyed by (reference weights, tokenized pairs, dtype); a later run with the same key (a beta sweep, a
  rerun) loads them and runs no reference forward pass. No reference copy stays in memory.
- otherwise a LoRA/QLoRA policy uses its base with the adapter disabled (no second copy) and full
  fine-tuning keeps a frozen copy (TRL's behaviour).
Batches are padding-free by default (train.packing): each batch's chosen and rejected sequences are packed into
rows whose sequences never attend to each other, and TRL's loss runs unchanged on the result (dpo_trainer.py).
Metrics use TRL's definitions (rewards/chosen = beta * sum over completion tokens of log pi - log pi_ref).
"""

from __future__ import annotations

import dataclasses

from trl import DPOConfig

from posttrain.checkpoints import guarded, train
from posttrain.config import Config
from posttrain.dpo_trainer import CachedReferenceDPOTrainer, look_up_reference, store_computed_reference
from posttrain.models import load_model, load_tokenizer, lora_config, resolve_path
from posttrain.outputs import finish_run, prepare_run_dir
from posttrain.packing import PaddingFreePreferenceCollator, flat_rows_needed, prepare_model
from posttrain.preference import preference_examples
from posttrain.ranks import on_main_then_shared
from posttrain.regional_compile import compile_decoder_layers
from posttrain.speed import fastest_attention, plan_dpo
from posttrain.training import LossHistory, model_card, run_metrics, trainer_args


def dpo_arguments(cfg: Config, plan) -> dict:
    """DPOConfig's own arguments; posttrain.training.trainer_args maps everything the recipes share."""
    return dict(beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type, loss_weights=cfg.dpo.loss_weights,
                label_smoothing=cfg.dpo.label_smoothing, precompute_ref_log_probs=cfg.dpo.precompute_ref,
                precompute_ref_batch_size=plan.reference_batch_size)


def main(cfg: Config, resume: bool = False) -> dict:
    # 1. Tokenizer and the pairs tokenized as TRL does (truncation counted, see preference.py), then the folder.
    resolved = resolve_path(cfg.model.name_or_path, cfg.model.allow_pickle)
    tokenizer = load_tokenizer(cfg.model, resolved)
    train_pairs, eval_pairs, data_counts = on_main_then_shared(preference_examples, cfg, tokenizer)  # once
    run_dir = prepare_run_dir(cfg, resume)  # after the data: a bad row never costs the folder's previous run

    # 2. Reference log-probs from the on-disk cache when this reference has already scored these pairs.
    model_cfg = fastest_attention(cfg.model)  # flash-attn when installed, else sdpa (see posttrain.speed)
    ref_name = cfg.dpo.ref_model or cfg.model.name_or_path
    ref_resolved = resolve_path(ref_name, cfg.model.allow_pickle)
    lookup = look_up_reference(cfg, model_cfg, ref_name, ref_resolved, train_pairs, eval_pairs)
    all_cached = cfg.dpo.precompute_ref and lookup.all_cached

    # 3. Policy, and a reference model only when one must run and differs from the starting model.
    model = load_model(model_cfg, resolved, tokenizer, cfg.adapter)
    ref_model = (load_model(dataclasses.replace(model_cfg, name_or_path=ref_name), ref_resolved, tokenizer)
                 if cfg.dpo.ref_model is not None and not all_cached else None)
    for loaded in filter(None, (model, ref_model)):
        prepare_model(loaded)  # no KV cache in training: packed sequences stay isolated

    # 4. Speed: micro-batch, accumulation, checkpointing, optimizer and kernels for this machine, each printed.
    plan = plan_dpo(cfg, model, train_pairs, reference_in_memory=not cfg.dpo.precompute_ref)
    plan.report()
    if plan.compile_layers:
        compile_decoder_layers(model)  # the policy's layers (also the reference pass when it scores the policy)

    # 5. Train. TRL computes whatever the cache lacked during construction; store it for the next run.
    history = LossHistory()
    trainer = guarded(CachedReferenceDPOTrainer)(
        model=model,
        ref_model=ref_model,
        data_collator=PaddingFreePreferenceCollator(tokenizer.pad_token_id, cfg.train.max_length,
                                                    flat_rows_needed(model)) if cfg.train.packing else None,
        args=trainer_args(cfg, DPOConfig, run_dir, lookup.eval_set is not None, plan, **dpo_arguments(cfg, plan)),
        train_dataset=lookup.train_set,
        eval_dataset=lookup.eval_set,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.adapter, model),
        callbacks=[history],
    )
    if cfg.dpo.precompute_ref:
        store_computed_reference(trainer, lookup)
        trainer.ref_model = ref_model = None  # precomputed: the reference is never run again
    # The starting point's held-out rewards/accuracies/margins, then train, then the same after.
    start_eval = trainer.evaluate() if lookup.eval_set is not None else {}
    train_output = train(trainer, resume)  # atomic checkpoints, --resume, NaN/SIGTERM guards
    final_eval = trainer.evaluate() if lookup.eval_set is not None else {}

    # 6. Outputs, metrics.json last.
    extra = {"eval_start": start_eval, "eval": final_eval, "reference_cache_hit": bool(all_cached),
             "speed": {**plan.as_dict(), "packing": cfg.train.packing},
             "reference_forwards": trainer.reference_forwards,
             "last_train_log": next((log for log in reversed(history.logs) if "loss" in log), {})}
    metrics = run_metrics(trainer, train_output, history, data_counts, extra)

    def save(folder):  # on every process: FSDP/ZeRO-3 gather the weights; the main process writes
        trainer.save_model(str(folder))  # model or adapter, and the tokenizer with its chat template

    method = f", {cfg.adapter.method}" if cfg.adapter else ""
    title = f"DPO ({'+'.join(cfg.dpo.loss_type)}, beta={cfg.dpo.beta}{method})"
    finish_run(run_dir, save, metrics, model_card(cfg, metrics, cfg.adapter is not None, title))
    return metrics
