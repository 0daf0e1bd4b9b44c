"""1.58-bit ternary quantization-aware fine-tuning (BitNet b1.58) of a pretrained model, on TRL's SFTTrainer.

Ternarizing a pretrained model without training collapses it (see `posttrain quantize`, the PTQ baseline);
fine-tuning with the quantizer phased in recovers most of it. The decoder's linear layers become BitLinear
(absmean ternary weights, one scale per tensor; 8-bit absmax activations per token; straight-through
gradients); embeddings and lm_head stay in high precision. lambda blends x + lambda * (q(x) - x).detach()
from 0 to 1 over ternary.lambda_warmup_steps. Any data the sft recipe takes works (chat or raw text).

Output: the model in transformers' BitNet format (packed 2-bit weights; loads with plain
AutoModelForCausalLM.from_pretrained), optionally a dense fake-quantized copy, and metrics.json with the bits
per weight of the quantized layers and of the whole file.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from posttrain.data.examples import sft_examples
from posttrain.data.packing import prepare_model
from posttrain.engine.distill import check_teacher, distilling, load_teacher, loss_terms, teacher_path
from posttrain.engine.plan import fastest_attention
from posttrain.engine.qat import convert_for_qat, lambda_after, save_ternary, warmup_steps
from posttrain.models import load_model, resolve_path
from posttrain.recipe import Data, Recipe, Setup, run_recipe, sft_setup


class Ternary(Recipe):
    trainer_class, args_class = SFTTrainer, SFTConfig
    trains_adapters = False  # the whole decoder trains through the quantizer

    def examples(self, cfg, tokenizer) -> Data:
        if cfg.distill is not None:  # a teacher with another vocabulary fails here, before the data and the run folder
            check_teacher(cfg, tokenizer, resolve_path(cfg.model.name_or_path, cfg.model.allow_pickle))
        return Data(*sft_examples(cfg, tokenizer))  # the sft recipe's data and loss masks

    def setup(self, run) -> Setup:
        # The pretrained (or SFT/DPO) model, its decoder linears swapped for BitLinear, quantizer off at step 0.
        model = load_model(fastest_attention(run.cfg.model), run.model_path, run.tokenizer)
        prepare_model(model)  # no KV cache in training: packed documents stay isolated
        converted, lambda_callback = convert_for_qat(model, run.cfg)
        # Packed rows as in sft (activations are quantized per token, so packed documents stay independent); the
        # callback sets lambda before every step (and after a resume, from the global step).
        setup = sft_setup(run, model, [lambda_callback])
        setup.state["ternary_layers"] = converted
        if run.cfg.distill is not None:  # the frozen teacher: the starting model unless distill.teacher names one
            self.trainer_class = distilling(SFTTrainer)
            setup.trainer_kwargs.update(teacher=load_teacher(run.cfg, teacher_path(run.cfg), run.tokenizer),
                                        distill=run.cfg.distill)
        return setup

    def metrics(self, trainer, run, setup, final_eval) -> dict:
        out = {"eval_loss": final_eval.get("eval_loss"), "ternary_layers": setup.state["ternary_layers"]}
        if run.cfg.distill is not None:  # the logged ce_loss, kd_loss (and relation, hidden) terms, per token
            out["distill"] = {"teacher": teacher_path(run.cfg), **loss_terms(trainer.state.log_history)}
        return out

    def save(self, trainer, run, setup, folder, metrics) -> None:
        # transformers' BitNet format (+ the fake-quant copy); bits per weight measured on the files written.
        save_ternary(trainer, run.cfg, run.model_path, run.tokenizer, folder, metrics,
                     lambda_after(run.cfg, trainer.state.global_step))

    def title(self, cfg) -> str:
        kd = f", distilled at T {cfg.distill.temperature}" if cfg.distill is not None else ""
        return (f"1.58-bit ternary QAT ({cfg.ternary.lambda_schedule} lambda warmup, {warmup_steps(cfg)} "
                f"steps{kd})")


def main(cfg, resume: bool = False) -> dict:
    return run_recipe(Ternary(), cfg, resume)
