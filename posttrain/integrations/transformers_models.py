"""transformers model internals that posttrain reads or sets (checked by tests/test_integrations.py).

- `config._attn_implementation`: the attention kernel a loaded model runs. flash-attention isolates packed
  documents only in a batch of one row (transformers' varlen path checks batch_size == 1), so for it a
  micro-batch's rows are concatenated into one; sdpa, eager and flex take (rows, length) batches and build the
  block-diagonal mask per row.
- `config._is_quantized`: set by transformers when a model loads through a quantizer (BitNet). A ternary folder
  loaded for training is turned back into trainable layers, and the flag must go with the quantizer, or
  transformers refuses to train or save it as a quantized model.
"""

from __future__ import annotations


def attention_implementation(model) -> str:
    return str(model.config._attn_implementation)


def flat_rows_needed(model) -> bool:
    """True when packed rows must be concatenated into one row per micro-batch (flash-attention's varlen path)."""
    return attention_implementation(model).startswith("flash")


def mark_not_quantized(config) -> None:
    config._is_quantized = False
