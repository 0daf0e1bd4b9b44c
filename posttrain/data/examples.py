"""Each objective's data entry point: a run config's train/eval rows read, normalized and tokenized, plus the data
counts that go into metrics.json."""

from __future__ import annotations

from posttrain.data.formats import load_splits
from posttrain.data.preference import tokenize_pairs
from posttrain.data.sft_tokenize import Tokenized, tokenize_rows


def sft_examples(cfg, tokenizer) -> tuple[Tokenized, Tokenized | None, dict]:
    """A run config's train/eval rows (any SFT format) tokenized with posttrain's loss masks, plus the data
    counts that go into metrics.json. Shared by every recipe that trains on SFT-style data."""
    train_rows, eval_rows = load_splits(cfg.data, cfg.train.seed)
    train_set = tokenize_rows(tokenizer, train_rows, cfg.train.max_length, cfg.data.train_on)
    eval_set = tokenize_rows(tokenizer, eval_rows, cfg.train.max_length, cfg.data.train_on) if eval_rows else None
    counts = {"format": train_rows.format, **train_set.counts, **train_rows.dropped,
              "supervised_tokens": train_set.supervised_tokens, "eval_rows": len(eval_set.examples) if eval_set else 0}
    return train_set, eval_set, counts


def preference_examples(cfg, tokenizer) -> tuple[list[dict], list[dict] | None, dict]:
    """A run config's train/eval preference pairs, tokenized as the DPO recipe trains on them, plus the data
    counts that go into metrics.json (the preference twin of sft_examples). The counts hold every reason a pair
    was dropped (the keys of DROPPED_PAIRS); dropped_note says them in words."""
    train_rows, eval_rows = load_splits(cfg.data, cfg.train.seed)
    train_pairs, counts = tokenize_pairs(tokenizer, train_rows, cfg.train.max_length)
    eval_pairs = tokenize_pairs(tokenizer, eval_rows, cfg.train.max_length)[0] if eval_rows else None
    return train_pairs, eval_pairs, counts


# Why pairs were dropped, as the counts name it -> (one pair, several pairs), for the DPO pairs line.
DROPPED_PAIRS = {
    "identical_chosen_rejected": ("identical pair", "identical pairs"),
    "empty_chosen_rejected": ("pair with an empty answer", "pairs with an empty answer"),
    "empty_prompt": ("pair with an empty prompt turn", "pairs with an empty prompt turn"),
    "prompt_too_long": ("pair whose prompt fills train.max_length", "pairs whose prompt fills train.max_length"),
}


def dropped_note(counts: dict) -> str:
    """What preference_examples' counts say was dropped, for the pairs line: " (1 identical pair dropped)", or ""
    when nothing was, so that "18 pairs" never hides a pair the data held."""
    parts = [f"{counts[key]} {one if counts[key] == 1 else many}"
             for key, (one, many) in DROPPED_PAIRS.items() if counts.get(key)]
    return f" ({', '.join(parts)} dropped)" if parts else ""
