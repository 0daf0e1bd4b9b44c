"""Supervised fine-tuning: full, LoRA or QLoRA (the `adapter` section decides), on TRL's SFTTrainer.

The steps every recipe shares (run folder, guards, saving, metrics.json last) are posttrain/recipe.py's; this
file holds what is specific to SFT, in the order it runs.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from posttrain.data.examples import sft_examples
from posttrain.data.packing import prepare_model
from posttrain.engine.plan import fastest_attention
from posttrain.models import load_model
from posttrain.recipe import Data, Recipe, Setup, run_recipe, sft_setup
from posttrain.ternary.lora import base_weight_bytes, packed_layers


class SFT(Recipe):
    trainer_class, args_class = SFTTrainer, SFTConfig

    def examples(self, cfg, tokenizer) -> Data:
        # posttrain's loss masks: assistant turns + end-of-turn token for chat rows, the completion for
        # prompt/completion rows, everything for text. TRL takes the ready `labels` as they are, so the mask is
        # ours for any chat template.
        return Data(*sft_examples(cfg, tokenizer))

    def setup(self, run) -> Setup:
        # Full precision or 4-bit (QLoRA); TRL wraps it with the LoRA adapter when one is configured.
        # Attention: flash-attn when installed, else sdpa; training never uses the KV cache (see data/packing.py).
        model = load_model(fastest_attention(run.cfg.model), run.model_path, run.tokenizer, run.cfg.adapter)
        prepare_model(model)
        setup = sft_setup(run, model)
        # LoRA on a ternary (BitNet) base: its linears stay packed in 2 bits; metrics.json gets the bytes they hold
        setup.state["ternary_base"] = base_weight_bytes(model) if packed_layers(model) else None
        return setup

    def metrics(self, trainer, run, setup, final_eval) -> dict:
        out = super().metrics(trainer, run, setup, final_eval)
        if setup.state["ternary_base"]:
            out["ternary_base"] = {**setup.state["ternary_base"], "ternary_merge": run.cfg.adapter.ternary_merge}
        return out

    def title(self, cfg) -> str:
        return f"Supervised fine-tuning ({cfg.adapter.method if cfg.adapter else 'full'})"


def main(cfg, resume: bool = False) -> dict:
    return run_recipe(SFT(), cfg, resume)
