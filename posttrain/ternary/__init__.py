"""1.58-bit ternary (BitNet b1.58): quantizers, QAT BitLinear, PTQ, 2-bit packing, transformers-loadable export.

Typical QAT flow:
    n = convert(model)                                     # decoder nn.Linear -> BitLinear (not lm_head)
    trainer = SFTTrainer(..., callbacks=[TernaryLambdaCallback(warmup_steps=1000)])
    export_bitnet(model, tokenizer, "out/")                 # AutoModelForCausalLM.from_pretrained("out/")
    export_gguf(model, tokenizer, "gguf/", "gguf-tq2")      # llama.cpp: gguf/model-tq2_0.gguf (needs `gguf`)
    fast = load_fast_ternary("out/", device="cuda")         # packed 2-bit kernels (Triton / C), same outputs
    graph_generate(fast, input_ids, 128).tokens             # decode as CUDA-graph replays: 1.16x bf16 on an H200
"""

import importlib

# Every name is imported on first use: `import posttrain.ternary` stays cheap (torch, transformers' Trainer and
# triton are only loaded by the parts that need them).
_WHERE = {
    "BitLinear": "posttrain.ternary.qat.bitlinear",
    "Decoded": "posttrain.ternary.infer.decode",
    "TernaryLambdaCallback": "posttrain.ternary.qat.warmup",
    "TernaryLinear": "posttrain.ternary.infer.linear",
    "absmean_scale": "posttrain.ternary.quant",
    "activation_codes": "posttrain.ternary.quant",
    "activation_quant": "posttrain.ternary.quant",
    "bitlinear_layers": "posttrain.ternary.qat.bitlinear",
    "bitnet_weight_scale": "posttrain.ternary.quant",
    "bits_per_weight": "posttrain.ternary.export.hf",
    "convert": "posttrain.ternary.qat.bitlinear",
    "dequantize": "posttrain.ternary.quant",
    "export_bitnet": "posttrain.ternary.export.hf",
    "export_fake_quant": "posttrain.ternary.export.hf",
    "export_gguf": "posttrain.ternary.export.gguf",
    "fuse_shared_inputs": "posttrain.ternary.infer.linear",
    "gguf_bits_per_weight": "posttrain.ternary.export.gguf",
    "graph_generate": "posttrain.ternary.infer.decode",
    "lambda_at": "posttrain.ternary.quant",
    "latent_from_ternary": "posttrain.ternary.quant",
    "load_fast_ternary": "posttrain.ternary.infer.linear",
    "load_ternary": "posttrain.ternary.export.hf",
    "matches_any": "posttrain.ternary.qat.bitlinear",
    "pack_ternary": "posttrain.ternary.pack",
    "quantizable_linears": "posttrain.ternary.qat.bitlinear",
    "set_quant_lambda": "posttrain.ternary.qat.bitlinear",
    "ste_blend": "posttrain.ternary.quant",
    "swap_ternary_linears": "posttrain.ternary.infer.linear",
    "ternarize_": "posttrain.ternary.qat.bitlinear",
    "ternary_codes": "posttrain.ternary.quant",
    "ternary_linear_reference": "posttrain.ternary.quant",
    "unpack_ternary": "posttrain.ternary.pack",
    "weight_quant": "posttrain.ternary.quant",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_WHERE])


__all__ = sorted(_WHERE)
