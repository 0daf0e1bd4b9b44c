"""1.58-bit ternary (BitNet b1.58): quantizers, QAT BitLinear, PTQ, 2-bit packing, transformers-loadable export.

Typical QAT flow:
    n = convert(model)                                     # decoder nn.Linear -> BitLinear (not lm_head)
    trainer = SFTTrainer(..., callbacks=[TernaryLambdaCallback(warmup_steps=1000)])
    export_bitnet(model, tokenizer, "out/")                 # AutoModelForCausalLM.from_pretrained("out/")
    export_gguf(model, tokenizer, "gguf/", "gguf-tq2")      # llama.cpp: gguf/model-tq2_0.gguf (needs `gguf`)
    fast = load_fast_ternary("out/", device="cuda")         # packed 2-bit kernels (Triton / C), same outputs
    graph_generate(fast, input_ids, 128).tokens             # decode as CUDA-graph replays: 1.16x bf16 on an H200
"""

from posttrain.ternary.bitlinear import (
    BitLinear,
    bitlinear_layers,
    convert,
    matches_any,
    quantizable_linears,
    set_quant_lambda,
    ternarize_,
)
from posttrain.ternary.decode import Decoded, graph_generate
from posttrain.ternary.export import (
    bits_per_weight,
    export_bitnet,
    export_fake_quant,
    load_ternary,
)
from posttrain.ternary.gguf_export import export_gguf, gguf_bits_per_weight
from posttrain.ternary.inference import (
    TernaryLinear,
    fuse_shared_inputs,
    load_fast_ternary,
    swap_ternary_linears,
)
from posttrain.ternary.pack import pack_ternary, unpack_ternary
from posttrain.ternary.quant import (
    absmean_scale,
    activation_codes,
    activation_quant,
    bitnet_weight_scale,
    dequantize,
    lambda_at,
    latent_from_ternary,
    ste_blend,
    ternary_codes,
    ternary_linear_reference,
    weight_quant,
)


def __getattr__(name: str):
    # lazy: transformers' Trainer stack takes seconds to import and is only needed when training
    if name == "TernaryLambdaCallback":
        from posttrain.ternary.callback import TernaryLambdaCallback

        return TernaryLambdaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BitLinear",
    "TernaryLambdaCallback",
    "TernaryLinear",
    "Decoded",
    "absmean_scale",
    "activation_codes",
    "activation_quant",
    "bitnet_weight_scale",
    "bitlinear_layers",
    "bits_per_weight",
    "convert",
    "dequantize",
    "export_bitnet",
    "export_fake_quant",
    "export_gguf",
    "fuse_shared_inputs",
    "gguf_bits_per_weight",
    "graph_generate",
    "lambda_at",
    "latent_from_ternary",
    "load_ternary",
    "load_fast_ternary",
    "matches_any",
    "pack_ternary",
    "quantizable_linears",
    "set_quant_lambda",
    "ste_blend",
    "swap_ternary_linears",
    "ternarize_",
    "ternary_codes",
    "ternary_linear_reference",
    "unpack_ternary",
    "weight_quant",
]
