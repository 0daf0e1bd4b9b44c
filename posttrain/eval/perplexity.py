"""Perplexity and bits per byte on held-out text, with a stated context and stride.

Each text is tokenized like lm-eval does (`tokenization.encode`) and opened with the prefix token (BOS, else
EOS), so every real token is predicted exactly once. Windows: the first predicts `context` tokens; each later
window predicts the next `stride` tokens (the last one: what is left) from an input of the `context` tokens that
end just before its last target, so every target sees at least `context - stride` tokens of history.
- stride == context is lm-eval's `loglikelihood_rolling` (disjoint windows, the last one right-aligned):
  the per-text sums are the same numbers, so perplexities agree to float rounding.
- stride < context is the sliding window of transformers' perplexity guide (lower, better-conditioned numbers),
  except that the guide's stride == max_length case loses one target per window, which this one does not.

Metrics: perplexity = exp(NLL / targets); bits_per_byte = NLL / ln 2 / UTF-8 bytes; word_perplexity =
exp(NLL / words) with lm-eval's word count len(re.split(r"\\s+", text)). NLL is summed over all texts first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from posttrain.eval.tokenization import encode, prefix_token_id


@dataclass
class Window:
    doc: int
    start: int  # input = seq[start:end]
    end: int
    n_targets: int  # the last n_targets input positions are scored


@dataclass
class TextLoglikelihoods:
    per_text: list[float]  # summed log-likelihood (nats) of each text, lm-eval's loglikelihood_rolling value
    n_targets: int
    n_bytes: int
    n_words: int
    per_text_counts: list[tuple[int, int, int]] = field(default_factory=list)  # (targets, bytes, words) per text

    def items(self) -> list[dict[str, float]]:
        """Per text: its NLL sum (nats), its counts, and the text's own perplexity and bits per byte. The table's
        numbers pool the sums over texts, so they are ratios of sums, not means of these per-text values."""
        out = []
        for ll, (targets, n_bytes, words) in zip(self.per_text, self.per_text_counts):
            nll = -ll
            out.append({
                "nll": nll, "tokens": targets, "bytes": n_bytes, "words": words,
                "perplexity": math.exp(nll / targets) if targets else math.nan,
                "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else math.nan,
            })
        return out

    def metrics(self) -> dict[str, float]:
        nll = -sum(self.per_text)
        return {
            "perplexity": math.exp(nll / self.n_targets),
            "bits_per_byte": nll / math.log(2) / self.n_bytes,
            "word_perplexity": math.exp(nll / self.n_words),
        }


def rolling_windows(n_seq: int, context: int, stride: int, doc: int = 0) -> list[Window]:
    """Windows over a sequence of n_seq tokens (prefix included); targets are positions 1..n_seq-1."""
    windows, done = [], 0  # `done` = index of the last position already predicted
    while done < n_seq - 1:
        end = min(done + (context if done == 0 else stride), n_seq - 1)
        start = max(0, end - context)
        windows.append(Window(doc, start, end, end - done))
        done = end
    return windows


def text_loglikelihoods(
    model, tokenizer, texts: list[str], context: int, stride: int, batch_size: int = 8, desc: str = "perplexity"
) -> TextLoglikelihoods:
    prefix = prefix_token_id(tokenizer)
    seqs = [[prefix] + encode(tokenizer, text) for text in texts]
    windows = [w for i, seq in enumerate(seqs) for w in rolling_windows(len(seq), context, stride, doc=i)]
    per_text = [0.0] * len(texts)
    for batch, logits in iterate_window_logits(model, seqs, windows, batch_size, desc):
        for row, w in enumerate(batch):
            targets = torch.tensor(seqs[w.doc][w.end - w.n_targets + 1 : w.end + 1], device=logits.device)
            logprobs = torch.log_softmax(scored_logits(logits, row, w).float(), dim=-1)
            per_text[w.doc] += logprobs.gather(-1, targets[:, None]).sum().item()
    counts = [(len(s) - 1, len(t.encode("utf-8")), len(re.split(r"\s+", t))) for s, t in zip(seqs, texts)]
    return TextLoglikelihoods(
        per_text=per_text,
        n_targets=sum(c[0] for c in counts),
        n_bytes=sum(c[1] for c in counts),
        n_words=sum(c[2] for c in counts),
        per_text_counts=counts,
    )


def scored_logits(logits: torch.Tensor, row: int, w: Window) -> torch.Tensor:
    """[n_targets, vocab]: the outputs at the window's scored positions (input position p predicts p + 1)."""
    return logits[row, w.end - w.start - w.n_targets : w.end - w.start]


def iterate_window_logits(model, seqs: list[list[int]], windows: list[Window], batch_size: int, desc: str):
    """Yield (windows, logits [batch, length, vocab]) for batches of windows.

    Windows are sorted longest first so a batch pads little; right padding needs no attention mask in a causal
    model because pads come after every position that is read.
    """
    device = next(model.parameters()).device
    order = sorted(windows, key=lambda w: -(w.end - w.start))
    for i in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch = order[i : i + batch_size]
        width = max(w.end - w.start for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, w in enumerate(batch):
            ids[row, : w.end - w.start] = torch.tensor(seqs[w.doc][w.start : w.end])
        # The context closes before the yield: a generator suspended inside inference_mode would leave it on
        # for the caller (and interleaved generators, as in drift, would leave it on for good).
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device)).logits
        yield batch, logits
