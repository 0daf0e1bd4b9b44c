"""Tokenization with exact loss masks, for any chat template.

TRL's `assistant_only_loss` needs `{% generation %}` tags in the template and silently gives an all-zero mask
without them; most real templates have none. So the mask is derived from rendered prefixes instead:

    before  = render(messages[:i], add_generation_prompt=True)   ends where assistant turn i's text starts
    through = render(messages[:i + 1])                           ends after turn i's end-of-turn markup
    full    = render(messages)

Turn i's supervised characters are full[len(before):len(through)]; tokens are mapped to characters with the
fast tokenizer's offsets. Inside that span we supervise through the LAST special token (the end-of-turn
token: <|im_end|>, <|eot_id|>, eos ...), and not the template's trailing newline after it. If the span holds
no special token, everything but trailing whitespace is supervised. A template that renders earlier turns
differently once later turns exist (so `before`/`through` are not prefixes of `full`) is refused with a
clear error rather than masked wrongly.

Plain prompt/completion and text rows are tokenized exactly as TRL does (EOS appended to the text, the
completion starting where prompt and prompt+completion token ids diverge), so runs are comparable with TRL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.errors import PosttrainError

IGNORE = -100


@dataclass
class Tokenized:
    """Training examples plus the counts of what was truncated or dropped (reported in metrics.json)."""

    examples: list[dict]
    counts: dict[str, int] = field(default_factory=dict)
    supervised_tokens: int = 0
    total_tokens: int = 0


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return ids


def _render(tokenizer, messages, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer, messages: list[dict], train_from: int, full: str, origin: str):
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise PosttrainError(
                f"{origin}: the chat template renders turn {i} differently once later turns follow, so the "
                "assistant tokens cannot be located; use a template without history rewriting or data.train_on: all"
            )
        spans.append((len(before), len(through)))
    return spans


def _mask_span(ids, offsets, start, end, specials, tokenizer) -> list[int]:
    """Token indices supervised for one assistant span [start, end) of characters."""
    inside = [t for t, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    specials_inside = [t for t in inside if ids[t] in specials]
    if specials_inside:
        return [t for t in inside if t <= specials_inside[-1]]
    while inside and not tokenizer.decode([ids[inside[-1]]]).strip():
        inside.pop()  # trailing template whitespace is not the model's to predict
    return inside


def chat_example(tokenizer, messages: list[dict], train_from: int, origin: str, specials: set[int]) -> dict:
    full = _render(tokenizer, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for start, end in _assistant_spans(tokenizer, messages, train_from, full, origin):
        for t in _mask_span(ids, offsets, start, end, specials, tokenizer):
            labels[t] = ids[t]
    return {"input_ids": ids, "labels": labels}


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def completion_example(tokenizer, prompt: str, completion: str) -> dict:
    """As TRL: EOS appended to the completion; it starts where the two tokenizations diverge."""
    if not completion.endswith(tokenizer.eos_token):
        completion += tokenizer.eos_token
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    start = common_prefix_length(prompt_ids, ids)
    return {"input_ids": ids, "labels": [IGNORE] * start + ids[start:]}


def text_example(tokenizer, text: str) -> dict:
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    ids = tokenizer(text)["input_ids"]
    return {"input_ids": ids, "labels": list(ids)}


def tokenize_rows(tokenizer, rows, max_length: int, train_on: str = "assistant") -> Tokenized:
    """Normalized SFT rows (posttrain.data.sources.Rows) -> examples with input_ids and labels.

    Rows longer than max_length are truncated (keep the start) and counted; rows with no supervised token
    left (no assistant turn, or truncated away) are counted and dropped, never trained on silently.
    """
    if rows.format == "preference":
        raise PosttrainError("preference data (chosen/rejected) is for recipe: dpo; the sft recipe needs "
                             "messages, prompt_completion, alpaca, sharegpt or text rows")
    specials = special_ids(tokenizer)
    out = Tokenized([], {"rows": len(rows.rows), "truncated": 0, "empty_mask": 0})
    for row, origin in zip(rows.rows, rows.origins):
        if "messages" in row:
            example = chat_example(tokenizer, row["messages"], row["train_from"], origin, specials)
            if train_on == "all":
                example["labels"] = list(example["input_ids"])
        elif "prompt" in row:
            example = completion_example(tokenizer, row["prompt"], row["completion"])
        else:
            example = text_example(tokenizer, row["text"])
        if len(example["input_ids"]) > max_length:
            out.counts["truncated"] += 1
            example = {k: v[:max_length] for k, v in example.items()}
        supervised = sum(label != IGNORE for label in example["labels"])
        if supervised == 0:
            out.counts["empty_mask"] += 1
            continue
        out.examples.append(example)
        out.supervised_tokens += supervised
        out.total_tokens += len(example["input_ids"])
    if not out.examples:
        raise PosttrainError(
            f"no trainable rows: all {len(rows.rows)} rows have an empty loss mask (no assistant turn, or "
            "truncated away); check the data's roles or raise train.max_length"
        )
    return out
