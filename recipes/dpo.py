"""Direct preference optimization on TRL's DPOTrainer, with a cheap, cached reference.

Starts from anything posttrain loads: a hub model, a full SFT output, or an SFT LoRA adapter (merged in
first). The reference model is the starting model unless dpo.ref_model names another:
- dpo.precompute_ref (default): reference log-probs are computed once, before training, and cached on disk
  keyed by (reference weights, tokenized pairs, dtype); a later run with the same key (a beta sweep, a
  rerun) loads them and runs no reference forward pass. No reference copy stays in memory.
- otherwise a LoRA/QLoRA policy uses its base with the adapter disabled (no second copy) and full
  fine-tuning keeps a frozen copy (TRL's behaviour).
Metrics use TRL's definitions (rewards/chosen = beta * sum over completion tokens of log pi - log pi_ref).
"""

from __future__ import annotations

import dataclasses

from trl import DPOConfig

from posttrain.config import Config
from posttrain.data import load_splits
from posttrain.dpo_trainer import (
    CachedReferenceDPOTrainer,
    reference_fingerprint,
    store_reference,
    with_cached_reference,
)
from posttrain.models import load_model, load_tokenizer, lora_config, resolve_path, torch_dtype
from posttrain.outputs import finish_run, prepare_run_dir
from posttrain.preference import tokenize_pairs
from posttrain.training import LossHistory, model_card, run_metrics, trainer_args


def main(cfg: Config) -> dict:
    # 1. Tokenizer and the pairs tokenized as TRL does (truncation counted, see preference.py), then the folder.
    resolved = resolve_path(cfg.model.name_or_path, cfg.model.allow_pickle)
    tokenizer = load_tokenizer(cfg.model, resolved)
    train_rows, eval_rows = load_splits(cfg.data, cfg.train.seed)
    train_pairs, data_counts = tokenize_pairs(tokenizer, train_rows, cfg.train.max_length)
    eval_pairs = tokenize_pairs(tokenizer, eval_rows, cfg.train.max_length)[0] if eval_rows else None
    run_dir = prepare_run_dir(cfg)  # after the data: a bad row never costs the folder's previous run

    # 2. Reference log-probs from the on-disk cache when this reference has already scored these pairs.
    ref_name = cfg.dpo.ref_model or cfg.model.name_or_path
    ref_resolved = resolve_path(ref_name, cfg.model.allow_pickle)
    reference = reference_fingerprint(ref_name, ref_resolved, cfg.model.revision)
    # a 4-bit (QLoRA) base scores differently from the same weights in full precision
    quantized = cfg.adapter.quant_type if cfg.adapter and cfg.adapter.method == "qlora" else "full"
    dtype = f"{torch_dtype(cfg.model.dtype)}|{cfg.model.attn_implementation}|{quantized}"
    train_set, train_key, train_hit = with_cached_reference(train_pairs, reference, dtype)
    eval_set, eval_key, eval_hit = (with_cached_reference(eval_pairs, reference, dtype) if eval_pairs
                                    else (None, None, True))
    all_cached = cfg.dpo.precompute_ref and train_hit and eval_hit
    print(f"posttrain: {len(train_pairs)} pairs; reference log-probs "
          f"{'from cache' if all_cached else 'computed this run' if cfg.dpo.precompute_ref else 'computed each step'}")

    # 3. Policy, and a reference model only when one must run and differs from the starting model.
    model = load_model(cfg.model, resolved, tokenizer, cfg.adapter)
    needs_ref_model = cfg.dpo.ref_model is not None and not all_cached
    ref_cfg = dataclasses.replace(cfg.model, name_or_path=ref_name)
    ref_model = load_model(ref_cfg, ref_resolved, tokenizer) if needs_ref_model else None

    # 4. Train. TRL computes whatever the cache lacked during construction; store it for the next run.
    history = LossHistory()
    trainer = CachedReferenceDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=trainer_args(cfg, DPOConfig, run_dir, eval_set is not None, beta=cfg.dpo.beta,
                          loss_type=cfg.dpo.loss_type, loss_weights=cfg.dpo.loss_weights,
                          label_smoothing=cfg.dpo.label_smoothing, precompute_ref_log_probs=cfg.dpo.precompute_ref),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.adapter, model),
        callbacks=[history],
    )
    if cfg.dpo.precompute_ref:
        store_reference(trainer.train_dataset, train_key, trainer.accelerator.is_main_process)
        if eval_set is not None:
            store_reference(trainer.eval_dataset, eval_key, trainer.accelerator.is_main_process)
        trainer.ref_model = ref_model = None  # precomputed: the reference is never run again
    # The starting point's held-out rewards/accuracies/margins, then train, then the same after.
    start_eval = trainer.evaluate() if eval_set is not None else {}
    train_output = trainer.train()
    final_eval = trainer.evaluate() if eval_set is not None else {}

    # 5. Outputs, metrics.json last.
    extra = {"eval_start": start_eval, "eval": final_eval, "reference_cache_hit": bool(all_cached),
             "reference_forwards": trainer.reference_forwards,
             "last_train_log": next((log for log in reversed(history.logs) if "loss" in log), {})}
    metrics = run_metrics(trainer, train_output, history, data_counts, extra)

    def save(folder):
        trainer.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    method = f", {cfg.adapter.method}" if cfg.adapter else ""
    title = f"DPO ({'+'.join(cfg.dpo.loss_type)}, beta={cfg.dpo.beta}{method})"
    finish_run(run_dir, save, metrics, model_card(cfg, metrics, cfg.adapter is not None, title))
    return metrics
