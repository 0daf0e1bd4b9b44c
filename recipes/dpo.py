"""Direct preference optimization on TRL's DPOTrainer, with a cheap, cached reference.

Starts from anything posttrain loads: a hub model, a full SFT output, or an SFT LoRA adapter (merged in
first). The reference model is the starting model unless dpo.ref_model names another:
- dpo.precompute_ref (default): reference log-probs are computed once, before training, and cached on disk
  keyed by (reference weights, tokenized pairs, dtype); a later run with the same key (a beta sweep, a
  rerun) loads them and runs no reference forward pass. No reference copy stays in memory.
- otherwise a LoRA/QLoRA policy uses its base with the adapter disabled (no second copy) and full
  fine-tuning keeps a frozen copy (TRL's behaviour).
Batches are padding-free by default (train.packing): each batch's chosen and rejected sequences are packed into
rows whose sequences never attend to each other, and TRL's loss runs unchanged on the result (integrations/trl_dpo.py).
Metrics use TRL's definitions (rewards/chosen = beta * sum over completion tokens of log pi - log pi_ref).
"""

from __future__ import annotations

import dataclasses

from trl import DPOConfig

from posttrain.data.examples import dropped_note, preference_examples
from posttrain.data.packing import PaddingFreePreferenceCollator, prepare_model
from posttrain.engine.compile import compile_decoder_layers
from posttrain.engine.plan import fastest_attention, plan_dpo
from posttrain.engine.reference import look_up_reference, store_computed_reference
from posttrain.integrations.transformers_models import flat_rows_needed
from posttrain.integrations.trl_dpo import CachedReferenceDPOTrainer
from posttrain.models import load_model, resolve_path
from posttrain.recipe import Data, Recipe, Setup, run_recipe


class DPO(Recipe):
    trainer_class, args_class = CachedReferenceDPOTrainer, DPOConfig

    def examples(self, cfg, tokenizer) -> Data:
        return Data(*preference_examples(cfg, tokenizer))  # tokenized as TRL does; truncation counted

    def setup(self, run) -> Setup:
        cfg = run.cfg
        # Reference log-probs from the on-disk cache when this reference has already scored these pairs.
        model_cfg = fastest_attention(cfg.model)  # flash-attn when installed, else sdpa (engine/plan.py)
        ref_name = cfg.dpo.ref_model or cfg.model.name_or_path
        ref_path = resolve_path(ref_name, cfg.model.allow_pickle)
        lookup = look_up_reference(cfg, model_cfg, ref_name, ref_path, run.data.train, run.data.eval,
                                   dropped_note(run.data.counts))
        all_cached = cfg.dpo.precompute_ref and lookup.all_cached

        # Policy, and a reference model only when one must run and differs from the starting model.
        model = load_model(model_cfg, run.model_path, run.tokenizer, cfg.adapter)
        ref_model = (load_model(dataclasses.replace(model_cfg, name_or_path=ref_name), ref_path, run.tokenizer)
                     if cfg.dpo.ref_model is not None and not all_cached else None)
        for loaded in filter(None, (model, ref_model)):
            prepare_model(loaded)  # no KV cache in training: packed sequences stay isolated

        # Speed: micro-batch, accumulation, checkpointing, optimizer and kernels for this machine, each printed.
        plan = plan_dpo(cfg, model, run.data.train, reference_in_memory=not cfg.dpo.precompute_ref)
        plan.report()
        if plan.compile_layers:
            compile_decoder_layers(model)  # the policy's layers (also the reference pass when it scores the policy)
        collator = (PaddingFreePreferenceCollator(run.tokenizer.pad_token_id, cfg.train.max_length,
                                                  flat_rows_needed(model)) if cfg.train.packing else None)
        return Setup(model=model, plan=plan, train_dataset=lookup.train_set, eval_dataset=lookup.eval_set,
                     data_collator=collator, speed={**plan.as_dict(), "packing": cfg.train.packing},
                     trainer_kwargs={"ref_model": ref_model}, args=self.dpo_arguments(cfg, plan),
                     state={"lookup": lookup, "all_cached": bool(all_cached)})

    @staticmethod
    def dpo_arguments(cfg, plan) -> dict:
        """DPOConfig's own arguments; engine/trainer_args.py maps everything the recipes share."""
        return dict(beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type, loss_weights=cfg.dpo.loss_weights,
                    label_smoothing=cfg.dpo.label_smoothing, precompute_ref_log_probs=cfg.dpo.precompute_ref,
                    precompute_ref_batch_size=plan.reference_batch_size)

    def after_build(self, trainer, run, setup) -> dict:
        # TRL computed whatever the cache lacked while it was built: store it for the next run.
        if run.cfg.dpo.precompute_ref:
            store_computed_reference(trainer, setup.state["lookup"])
            trainer.ref_model = None  # precomputed: the reference is never run again
        # The starting point's held-out rewards/accuracies/margins, to compare with the same after training.
        return {"eval_start": trainer.evaluate() if setup.eval_dataset is not None else {}}

    def metrics(self, trainer, run, setup, final_eval) -> dict:
        last_train_log = next((log for log in reversed(trainer.state.log_history) if "loss" in log), {})
        return {"eval": final_eval, "reference_cache_hit": setup.state["all_cached"],
                "reference_forwards": trainer.reference_forwards, "last_train_log": last_train_log}

    def title(self, cfg) -> str:
        method = f", {cfg.adapter.method}" if cfg.adapter else ""
        return f"DPO ({'+'.join(cfg.dpo.loss_type)}, beta={cfg.dpo.beta}{method})"


def main(cfg, resume: bool = False) -> dict:
    return run_recipe(DPO(), cfg, resume)
