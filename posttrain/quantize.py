"""`posttrain quantize`: post-training ternarization (no training), the baseline that shows why QAT is needed.

Every decoder linear layer's weights become RoundClip(W / mean|W|, -1, 1) * mean|W| (one scale per tensor),
activations 8-bit per token, exactly as the QAT recipe's model at lambda = 1; embeddings and lm_head stay
dense. Formats: `hf` (transformers' BitNet format, packed 2-bit, loads with plain from_pretrained) or
`fake-quant` (dense weights equal to ternary x scale, for tools that want dense weights). The source may be a
full model folder, a LoRA adapter (merged first), a hub name, or a posttrain ternary export.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.config import ModelConfig
from posttrain.errors import PosttrainError

FORMATS = ("hf", "fake-quant")


def quantize(model: str, out_dir: str | Path, method: str = "ternary", fmt: str = "hf", skip: list[str] | None = None,
             dtype: str = "auto", overwrite: bool = False, allow_pickle: bool = False) -> dict:
    from posttrain.models import load_model, load_tokenizer, resolve_path
    from posttrain.ternary import bits_per_weight, convert, export_bitnet, export_fake_quant

    if method != "ternary":
        raise PosttrainError(f"--method {method!r} is not available; posttrain quantizes with --method ternary")
    if fmt not in FORMATS:
        raise PosttrainError(f"--format {fmt!r} is not available; choose one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    if any(p.exists() and not p.is_dir() for p in (out_dir, *out_dir.parents)):
        raise PosttrainError(f"--out {out_dir}: a file is in the way; choose a folder path")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise PosttrainError(f"--out {out_dir} is not empty; choose another folder or pass --overwrite")
    cfg = ModelConfig(name_or_path=model, dtype=dtype, allow_pickle=allow_pickle)
    resolved = resolve_path(model, allow_pickle)
    tokenizer = load_tokenizer(cfg, resolved)
    loaded = load_model(cfg, resolved, tokenizer)
    layers = convert(loaded, skip=skip or [], quant_lambda=1.0)
    if fmt == "hf":
        export_bitnet(loaded, tokenizer, out_dir, overwrite=True)
    else:
        export_fake_quant(loaded, tokenizer, out_dir, overwrite=True)
    report = {"source": model, "method": "ternary-ptq", "format": fmt, "ternary_layers": layers,
              "bits_per_weight": bits_per_weight(out_dir) if fmt == "hf" else None}
    (out_dir / "quantize.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
