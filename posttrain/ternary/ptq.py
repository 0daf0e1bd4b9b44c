"""`posttrain quantize`: post-training ternarization (no training), the baseline that shows why QAT is needed.

Every decoder linear layer's weights become RoundClip(W / mean|W|, -1, 1) * mean|W| (one scale per tensor),
activations 8-bit per token, exactly as the QAT recipe's model at lambda = 1; embeddings and lm_head stay
dense. Formats: `hf` (transformers' BitNet format, packed 2-bit, loads with plain from_pretrained),
`fake-quant` (dense weights equal to ternary x scale, for tools that want dense weights), or `gguf-tq1` /
`gguf-tq2` (one llama.cpp GGUF file, OUT/model-tq1_0.gguf or model-tq2_0.gguf: ternary layers in TQ1_0 / TQ2_0,
embeddings and head in `gguf_dense`, see posttrain/ternary/export/gguf.py). The source may be a full model
folder, a LoRA adapter (merged first), a hub name, or a posttrain ternary export (its ternary weights are
used as they are).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.config.schema import ModelConfig
from posttrain.errors import PosttrainError
from posttrain.files import check_output_folder

FORMATS = ("hf", "fake-quant", "gguf-tq1", "gguf-tq2")


def quantize(model: str, out_dir: str | Path, method: str = "ternary", fmt: str = "hf", skip: list[str] | None = None,
             dtype: str = "auto", overwrite: bool = False, allow_pickle: bool = False, gguf_dense: str = "f16") -> dict:
    from posttrain.models import load_model, load_tokenizer, resolve_path
    from posttrain.ternary import bits_per_weight, convert, export_bitnet, export_fake_quant

    if method != "ternary":
        raise PosttrainError(f"--method {method!r} is not available; posttrain quantizes with --method ternary")
    if fmt not in FORMATS:
        raise PosttrainError(f"--format {fmt!r} is not available; choose one of {', '.join(FORMATS)}")
    if fmt.startswith("gguf"):
        from posttrain.ternary.export.gguf import check_gguf_options

        check_gguf_options(fmt, gguf_dense)  # before loading: a bad option or no gguf package fails fast
    out_dir = check_output_folder(out_dir, "--out", overwrite)
    cfg = ModelConfig(name_or_path=model, dtype=dtype, allow_pickle=allow_pickle)
    resolved = resolve_path(model, allow_pickle)
    tokenizer = load_tokenizer(cfg, resolved)
    loaded = load_model(cfg, resolved, tokenizer)
    layers = convert(loaded, skip=skip or [], quant_lambda=1.0)
    if fmt.startswith("gguf"):
        return _quantize_gguf(model, loaded, tokenizer, out_dir, fmt, gguf_dense, layers)
    if fmt == "hf":
        export_bitnet(loaded, tokenizer, out_dir, overwrite=True)
    else:
        export_fake_quant(loaded, tokenizer, out_dir, overwrite=True)
    report = {"source": model, "method": "ternary-ptq", "format": fmt, "ternary_layers": layers,
              "bits_per_weight": bits_per_weight(out_dir) if fmt == "hf" else None}
    (out_dir / "quantize.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _quantize_gguf(source: str, loaded, tokenizer, out_dir: Path, fmt: str, dense: str, converted: int) -> dict:
    from posttrain.ternary import bitlinear_layers
    from posttrain.ternary.export.gguf import export_gguf, gguf_bits_per_weight

    path = export_gguf(loaded, tokenizer, out_dir, fmt, dense_type=dense, overwrite=True)
    report = {"source": source, "method": "ternary-ptq" if converted else "ternary (source weights)",
              "format": fmt, "file": path.name, "gguf_dense": dense,
              "ternary_layers": len(bitlinear_layers(loaded)), "bits_per_weight": gguf_bits_per_weight(path)}
    (out_dir / "quantize.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
