"""Training through the 1.58-bit quantizer, for every recipe that does it (ternary: on SFT data; grpo: with
rl.ternary or from a ternary model): the decoder's linears swapped for BitLinear, the lambda warm-up, and the
export in transformers' BitNet format. One copy, so the recipes cannot drift apart.
"""

from __future__ import annotations

from posttrain import log
from posttrain.engine.distributed import whole_model
from posttrain.models import load_model
from posttrain.ternary.export.hf import bits_per_weight, export_bitnet, export_fake_quant
from posttrain.ternary.qat.bitlinear import convert, set_quant_lambda
from posttrain.ternary.qat.warmup import TernaryLambdaCallback
from posttrain.ternary.quant import lambda_at


def layer_settings(cfg) -> dict:
    s = cfg.ternary
    return dict(skip=s.skip, granularity=s.granularity, group_size=s.group_size, use_rms_norm=s.use_rms_norm,
                quant_lambda=0.0)


def warmup_steps(cfg) -> int:
    return 0 if cfg.ternary.lambda_schedule == "none" else cfg.ternary.lambda_warmup_steps


def convert_for_qat(model, cfg) -> tuple[int, TernaryLambdaCallback]:
    """The model's decoder linears as BitLinear, quantizer off at step 0; the callback sets lambda before every
    step (and after a resume, from the global step)."""
    converted = convert(model, **layer_settings(cfg))
    log.info(f"{converted} linear layers -> BitLinear; lambda {cfg.ternary.lambda_schedule} over "
             f"{warmup_steps(cfg)} steps")
    return converted, TernaryLambdaCallback(warmup_steps(cfg), cfg.ternary.lambda_schedule)


def lambda_after(cfg, step: int) -> float:
    return lambda_at(step, warmup_steps(cfg), cfg.ternary.lambda_schedule)


def rebuild(cfg, model_path: str, tokenizer, quant_lambda: float):
    """The trained architecture on the CPU, with the quantizer where training left it, for weights gathered
    from a sharded (FSDP) run."""
    model = load_model(cfg.model, model_path, tokenizer)
    convert(model, **layer_settings(cfg))  # leaves the BitLinear layers of a ternary starting model as they are
    set_quant_lambda(model, quant_lambda)
    return model


def save_ternary(trainer, cfg, model_path: str, tokenizer, folder, metrics: dict, quant_lambda: float) -> None:
    """transformers' BitNet format (+ the fake-quant copy); bits per weight measured on the files written. Runs on
    every process (a sharded model is gathered collectively); the main one writes."""
    with whole_model(trainer, lambda: rebuild(cfg, model_path, tokenizer, quant_lambda)) as model:
        if model is None:  # not the main process: it took part in the gather, the main process writes
            return
        export_bitnet(model, tokenizer, folder, overwrite=True)
        metrics["bits_per_weight"] = bits_per_weight(folder)
        if cfg.ternary.fake_quant_export:
            export_fake_quant(model, tokenizer, folder / "fake_quant", overwrite=True)
