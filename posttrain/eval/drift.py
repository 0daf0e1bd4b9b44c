"""How far a variant moved from its base: per-token KL(base || variant) and top-1 agreement on held-out text.

Both models read the same token windows (perplexity's windows with stride == context); at every scored position
KL = sum_v p_base(v) * (log p_base(v) - log p_variant(v)) in nats, and agreement = [argmax p_base == argmax
p_variant]. Both are averaged over all scored positions of all texts (each token counts once, long texts weigh
more). KL(base || variant) is the direction that punishes a variant for dropping what the base considered
likely, the usual choice for quantization and fine-tuning drift.
"""

from __future__ import annotations

import math

import torch

from posttrain.eval.perplexity import iterate_window_logits, rolling_windows, scored_logits
from posttrain.eval.tokenization import encode, prefix_token_id


def drift_metrics(base, variant, texts: list[str], context: int, batch_size: int = 8) -> dict[str, float]:
    """base/variant: loaded `Variant`s sharing one vocabulary (checked by the caller)."""
    return drift_measure(base, variant, texts, context, batch_size)[0]


def drift_measure(base, variant, texts: list[str], context: int, batch_size: int = 8) -> tuple[dict, list[dict]]:
    """(the table's {"kl", "top1_agreement"}, per text {"kl_sum", "agreements", "tokens", "kl", "top1_agreement"}).
    The table pools every scored token of every text; a text's own kl and top1_agreement are over its tokens."""
    tokenizer = base.tokenizer
    prefix = prefix_token_id(tokenizer)
    seqs = [[prefix] + encode(tokenizer, t) for t in texts]
    windows = [w for i, s in enumerate(seqs) for w in rolling_windows(len(s), context, context, doc=i)]
    vocab = len(tokenizer)  # logits may be padded past the tokenizer (e.g. to a multiple of 64): ignore that tail
    kl_sum, agree, count = [0.0] * len(texts), [0] * len(texts), [0] * len(texts)
    base_batches = iterate_window_logits(base.model, seqs, windows, batch_size, desc=f"drift {base.name}")
    variant_batches = iterate_window_logits(variant.model, seqs, windows, batch_size, desc=f"drift {variant.name}")
    for (batch, base_logits), (_, variant_logits) in zip(base_batches, variant_batches):
        for row, w in enumerate(batch):
            logp = torch.log_softmax(scored_logits(base_logits, row, w)[:, :vocab].float(), dim=-1)
            logq = torch.log_softmax(scored_logits(variant_logits, row, w)[:, :vocab].float().to(logp.device), dim=-1)
            kl_sum[w.doc] += (logp.exp() * (logp - logq)).sum().item()
            agree[w.doc] += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
            count[w.doc] += w.n_targets
    items = [
        {"kl_sum": k, "agreements": a, "tokens": n, "kl": k / n if n else math.nan,
         "top1_agreement": a / n if n else math.nan}
        for k, a, n in zip(kl_sum, agree, count)
    ]
    total = sum(count)
    return {"kl": sum(kl_sum) / total, "top1_agreement": sum(agree) / total}, items
