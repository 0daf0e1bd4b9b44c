"""Padding-free packing: tokenized documents packed into rows of max_length that never attend to each other.

Isolation. Each packed row carries `position_ids` that restart at 0 for every document, and NO attention_mask.
transformers then builds the block-diagonal causal mask from the position_ids (`find_packed_sequence_indices`)
for sdpa, eager and flex attention, and flash-attention-2 runs its varlen kernel from them. It does so only
when the forward gets no cache: with a cache it silently lets documents attend to each other, so training runs
with use_cache=False (TRL passes it; `prepare_model` also sets it in the model's config).

Labels. HF shifts labels inside the model: position t is trained to predict labels[t + 1]. In a packed row the
first token of document k+1 would be predicted from the last token of document k, so its label is IGNORE.
Unpacked training never makes that prediction either (a row's first label is never predicted), so packed and
unpacked training supervise exactly the same tokens with the same contexts.

Loss. The Trainer counts the supervised tokens of a whole optimizer step (all its micro-batches, all processes)
as num_items_in_batch, and TRL divides each micro-batch's summed token loss by it: the step's loss is the mean
over every supervised token of the step, however the documents are packed or accumulated.

Packing: best-fit decreasing (longest document first, into the row whose free space it fills best), after a
seeded shuffle so equal lengths do not keep their file order. Rows are ~98% full on length-varied data.

Evaluation stays unpacked (padded batches with an attention mask): eval_loss is then computed exactly as in a
run without packing and as in plain TRL, so it is comparable across packed and unpacked runs.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

import torch

from posttrain.data.sft_tokenize import IGNORE


def best_fit_decreasing(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` tokens (each length <= capacity)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: the shuffle decides among equal lengths
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted: bisect finds the tightest fit
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"a document of {lengths[i]} tokens does not fit in a row of {capacity}")
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(slot)
            bins[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def packed_row(documents: list[dict]) -> dict:
    """One row from several {input_ids, labels} documents: position_ids restart per document, and each
    document's first label is IGNORE (it would otherwise be predicted from the previous document)."""
    row = {"input_ids": [], "labels": [], "position_ids": []}
    for doc in documents:
        row["input_ids"] += doc["input_ids"]
        row["labels"] += [IGNORE] + list(doc["labels"][1:])
        row["position_ids"] += list(range(len(doc["input_ids"])))
    return row


@dataclass
class Packed:
    """Packed training rows and what packing did (printed at start, kept in metrics.json)."""

    rows: list[dict]
    documents: int
    tokens: int
    capacity: int
    stats: dict = field(default_factory=dict)

    @property
    def mean_row_tokens(self) -> float:
        return self.tokens / max(len(self.rows), 1)

    def summary(self) -> str:
        fill = self.mean_row_tokens / self.capacity
        return (f"{self.documents:,} documents -> {len(self.rows):,} rows of {self.capacity} tokens "
                f"({fill:.1%} full, no padding inside rows); documents isolated by position_ids")


def pack_examples(examples: list[dict], max_length: int, seed: int = 0) -> Packed:
    """Tokenized {input_ids, labels} examples (each <= max_length) packed into rows of max_length."""
    lengths = [len(e["input_ids"]) for e in examples]
    rows = [packed_row([examples[i] for i in sorted(b)]) for b in best_fit_decreasing(lengths, max_length, seed)]
    packed = Packed(rows, len(examples), sum(lengths), max_length)
    fill = round(packed.mean_row_tokens / max_length, 4)
    packed.stats = {"documents": len(examples), "rows": len(rows), "row_fill": fill}
    return packed


def tightest_rows(lengths: list[int]) -> list[list[int]]:
    """Best-fit-decreasing rows for the row capacity that leaves the fewest padded slots (rows x longest row),
    trying capacities from the longest sequence (one per row: never more slots than padding) to 3x it. A
    preference batch is a handful of sequences of similar lengths, for which rows of a fixed length (say
    max_length) are often left a third empty."""
    longest = max(lengths)
    best = None
    for capacity in sorted({longest + longest * i // 8 for i in range(17)}):
        bins = best_fit_decreasing(lengths, capacity)
        cost = len(bins) * max(sum(lengths[i] for i in b) for b in bins)
        if best is None or cost < best[0]:
            best = (cost, bins)
    return best[1]


def _pad(seqs: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


@dataclass
class PaddingFreeCollator:
    """Batches packed rows as input_ids, labels and position_ids, with NO attention_mask (so the model isolates
    the documents). Rows shorter than the batch's longest are filled with a padding segment of their own
    (position_ids from 0, labels IGNORE); with `flatten` (flash-attention) the rows are concatenated into one,
    without any padding, plus the sequence boundaries flash-attention's varlen kernels take. Unpacked rows
    (evaluation) are padded with an attention mask, as TRL's collator does."""

    pad_token_id: int
    flatten: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        ids = [list(e["input_ids"]) for e in examples]
        labels = [list(e.get("labels", e["input_ids"])) for e in examples]
        packed = "position_ids" in examples[0]
        positions = [list(e["position_ids"]) for e in examples] if packed else None
        if packed and self.flatten:
            ids, labels, positions = [sum(ids, [])], [sum(labels, [])], [sum(positions, [])]
        length = max(len(s) for s in ids)
        batch = {"input_ids": _pad(ids, self.pad_token_id, length), "labels": _pad(labels, IGNORE, length)}
        if not packed:
            batch["attention_mask"] = _pad([[1] * len(s) for s in ids], 0, length)
            return batch
        batch["position_ids"] = torch.tensor([p + list(range(length - len(p))) for p in positions], dtype=torch.long)
        if self.flatten:  # computed here once, instead of from position_ids in every layer (a device sync each)
            starts = [i for i, p in enumerate(positions[0]) if p == 0] + [length]
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(starts, dtype=torch.int32)
            batch["max_length_q"] = batch["max_length_k"] = max(b - a for a, b in zip(starts, starts[1:]))
        return batch


def prepare_model(model) -> None:
    """Training never uses the KV cache; with one, packed documents would attend to each other."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.use_cache = False


# ----------------------------------------------------------------------------------------------------------
# Preference pairs (DPO): each batch's chosen and rejected sequences packed into rows, with a map back to
# TRL's padded layout so that TRL's loss code runs unchanged on the packed forward's per-token outputs.

PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_labels", "packed_index")


@dataclass
class PaddingFreePreferenceCollator:
    """TRL's padded preference batch ([chosen..., rejected...] rows, which TRL's loss reads) plus the same
    sequences packed into rows (best fit decreasing, row length chosen to leave the least padding: see
    tightest_rows), for the forward pass:

    packed_input_ids, packed_position_ids, packed_labels: (rows, row_length); labels are the completion tokens,
        IGNORE elsewhere and at each sequence's first token.
    packed_index: (2 * pairs, padded_length - 1): for each of TRL's next-token positions, its flat index among the
        packed rows' next-token positions (rows x (row_length - 1)), or -1 where TRL has none (padding).
    """

    pad_token_id: int
    max_length: int | None = None
    flatten: bool = False  # one row for the whole batch (flash-attention, see flat_rows_needed)

    def __call__(self, examples: list[dict]) -> dict:
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        batch = DataCollatorForPreference(pad_token_id=self.pad_token_id, max_length=self.max_length)(examples)
        keep = slice(None, self.max_length)  # TRL's truncation: keep the start
        seqs, labels = [], []
        for completion in ("chosen_ids", "rejected_ids"):
            for e in examples:
                ids = (list(e["prompt_ids"]) + list(e[completion]))[keep]
                seqs.append(ids)
                labels.append(([IGNORE] * len(e["prompt_ids"]) + list(e[completion]))[keep])
        lengths = [len(s) for s in seqs]
        bins = [list(range(len(seqs)))] if self.flatten else tightest_rows(lengths)
        row_length = max(sum(len(seqs[i]) for i in b) for b in bins)
        rows = [packed_row([{"input_ids": seqs[i], "labels": labels[i]} for i in b]) for b in bins]
        index = torch.full((len(seqs), batch["input_ids"].shape[1] - 1), -1, dtype=torch.long)
        for r, members in enumerate(bins):
            offset = r * (row_length - 1)
            for i in members:  # next-token position t of sequence i predicts its token t + 1
                index[i, : len(seqs[i]) - 1] = torch.arange(offset, offset + len(seqs[i]) - 1)
                offset += len(seqs[i])
        positions = [row["position_ids"] + list(range(row_length - len(row["position_ids"]))) for row in rows]
        batch.update(packed_input_ids=_pad([row["input_ids"] for row in rows], self.pad_token_id, row_length),
                     packed_position_ids=torch.tensor(positions, dtype=torch.long),
                     packed_labels=_pad([row["labels"] for row in rows], IGNORE, row_length), packed_index=index)
        return batch
