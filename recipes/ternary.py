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

from posttrain import log
from posttrain.data.examples import sft_examples
from posttrain.data.packing import prepare_model
from posttrain.engine.distributed import whole_model
from posttrain.engine.plan import fastest_attention
from posttrain.models import load_model
from posttrain.recipe import Data, Recipe, Setup, run_recipe, sft_setup
from posttrain.ternary.export.hf import bits_per_weight, export_bitnet, export_fake_quant
from posttrain.ternary.qat.bitlinear import convert, set_quant_lambda
from posttrain.ternary.qat.warmup import TernaryLambdaCallback
from posttrain.ternary.quant import lambda_at


class Ternary(Recipe):
    trainer_class, args_class = SFTTrainer, SFTConfig
    trains_adapters = False  # the whole decoder trains through the quantizer

    def examples(self, cfg, tokenizer) -> Data:
        return Data(*sft_examples(cfg, tokenizer))  # the sft recipe's data and loss masks

    def setup(self, run) -> Setup:
        # The pretrained (or SFT/DPO) model, its decoder linears swapped for BitLinear, quantizer off at step 0.
        model = load_model(fastest_attention(run.cfg.model), run.model_path, run.tokenizer)
        prepare_model(model)  # no KV cache in training: packed documents stay isolated
        converted = convert(model, **self.layer_settings(run.cfg))
        warmup = self.warmup_steps(run.cfg)
        log.info(f"{converted} linear layers -> BitLinear; lambda {run.cfg.ternary.lambda_schedule} over "
                 f"{warmup} steps")
        # Packed rows as in sft (activations are quantized per token, so packed documents stay independent); the
        # callback sets lambda before every step (and after a resume, from the global step).
        setup = sft_setup(run, model, [TernaryLambdaCallback(warmup, run.cfg.ternary.lambda_schedule)])
        setup.state["ternary_layers"] = converted
        return setup

    def metrics(self, trainer, run, setup, final_eval) -> dict:
        return {"eval_loss": final_eval.get("eval_loss"), "ternary_layers": setup.state["ternary_layers"]}

    def save(self, trainer, run, setup, folder, metrics) -> None:
        # transformers' BitNet format (+ the fake-quant copy); bits per weight measured on the files written.
        with whole_model(trainer, lambda: self.rebuild(run, trainer.state.global_step)) as model:
            if model is None:  # not the main process: it took part in the gather, the main process writes
                return
            export_bitnet(model, run.tokenizer, folder, overwrite=True)
            metrics["bits_per_weight"] = bits_per_weight(folder)
            if run.cfg.ternary.fake_quant_export:
                export_fake_quant(model, run.tokenizer, folder / "fake_quant", overwrite=True)

    def rebuild(self, run, step: int):
        """The trained architecture on the CPU, with the quantizer where training left it, for weights gathered
        from a sharded (FSDP) run."""
        model = load_model(run.cfg.model, run.model_path, run.tokenizer)
        convert(model, **self.layer_settings(run.cfg))
        set_quant_lambda(model, lambda_at(step, self.warmup_steps(run.cfg), run.cfg.ternary.lambda_schedule))
        return model

    @staticmethod
    def layer_settings(cfg) -> dict:
        s = cfg.ternary
        return dict(skip=s.skip, granularity=s.granularity, group_size=s.group_size, use_rms_norm=s.use_rms_norm,
                    quant_lambda=0.0)

    @staticmethod
    def warmup_steps(cfg) -> int:
        return 0 if cfg.ternary.lambda_schedule == "none" else cfg.ternary.lambda_warmup_steps

    def title(self, cfg) -> str:
        return (f"1.58-bit ternary QAT ({cfg.ternary.lambda_schedule} lambda warmup, {self.warmup_steps(cfg)} "
                "steps)")


def main(cfg, resume: bool = False) -> dict:
    return run_recipe(Ternary(), cfg, resume)
