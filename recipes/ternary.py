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

from posttrain.checkpoints import guarded, train
from posttrain.config import Config
from posttrain.masks import sft_examples
from posttrain.models import load_model, load_tokenizer, resolve_path
from posttrain.outputs import finish_run, prepare_run_dir
from posttrain.packing import prepare_model, sft_inputs
from posttrain.ranks import on_main_then_shared
from posttrain.speed import fastest_attention
from posttrain.ternary import bits_per_weight, convert, export_bitnet, export_fake_quant
from posttrain.ternary.callback import TernaryLambdaCallback
from posttrain.training import LossHistory, model_card, run_metrics, trainer_args


def main(cfg: Config, resume: bool = False) -> dict:
    # 1. Data with posttrain's loss masks (as in the sft recipe), then the output folder.
    resolved = resolve_path(cfg.model.name_or_path, cfg.model.allow_pickle)
    tokenizer = load_tokenizer(cfg.model, resolved)
    train_set, eval_set, data_counts = on_main_then_shared(sft_examples, cfg, tokenizer)  # once, not per rank
    run_dir = prepare_run_dir(cfg, resume)  # after the data: a bad row never costs the folder's previous run

    # 2. The pretrained (or SFT/DPO) model, its decoder linears swapped for BitLinear, quantizer off at step 0.
    model = load_model(fastest_attention(cfg.model), resolved, tokenizer)
    prepare_model(model)  # no KV cache in training: packed documents stay isolated
    settings = cfg.ternary
    converted = convert(model, skip=settings.skip, granularity=settings.granularity, group_size=settings.group_size,
                        use_rms_norm=settings.use_rms_norm, quant_lambda=0.0)
    warmup = 0 if settings.lambda_schedule == "none" else settings.lambda_warmup_steps
    print(f"posttrain: {converted} linear layers -> BitLinear; lambda {settings.lambda_schedule} over {warmup} steps")

    # 3. Speed, as in the sft recipe: packed rows (activations are quantized per token, so packed documents
    #    stay independent), micro-batch, accumulation, checkpointing, optimizer, kernels; each printed.
    inputs = sft_inputs(cfg, model, tokenizer, train_set, eval_set)

    # 4. Train; the callback sets lambda before every step (and after a resume, from the global step).
    history = LossHistory()
    trainer = guarded(SFTTrainer)(
        model=model,
        args=trainer_args(cfg, SFTConfig, run_dir, eval_set is not None, inputs.plan,
                          dataset_kwargs={"skip_prepare_dataset": True}),  # tokenized, masked, truncated: ours
        data_collator=inputs.data_collator,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.eval_dataset,
        processing_class=tokenizer,
        callbacks=[history, TernaryLambdaCallback(warmup, settings.lambda_schedule)],
    )
    train_output = train(trainer, resume)  # atomic checkpoints, --resume, NaN/SIGTERM guards
    final_eval = trainer.evaluate() if eval_set else {}

    # 5. Export: transformers' BitNet format in output_dir (+ fake-quant copy), bits per weight, metrics last.
    extra = {"eval_loss": final_eval.get("eval_loss"), "ternary_layers": converted, "speed": inputs.speed}
    metrics = run_metrics(trainer, train_output, history, data_counts, extra)

    def save(folder):  # called on every process; under DDP each holds the full model, the main one writes
        if not trainer.args.should_save:
            return
        export_bitnet(trainer.model, tokenizer, folder, overwrite=True)
        metrics["bits_per_weight"] = bits_per_weight(folder)  # measured on the files, before metrics.json
        if settings.fake_quant_export:
            export_fake_quant(trainer.model, tokenizer, folder / "fake_quant", overwrite=True)

    title = f"1.58-bit ternary QAT ({settings.lambda_schedule} lambda warmup, {warmup} steps)"
    finish_run(run_dir, save, metrics, model_card(cfg, metrics, False, title))
    return metrics
