"""Preference pairs tokenized as TRL's DPOTrainer does (so losses and rewards are comparable with TRL's).

The prompt is rendered with the generation prompt; each completion is what prompt+completion adds after the
common token prefix (for chat rows that includes the end-of-turn token and the template's newline); plain
strings get EOS appended. Truncation policy (stated, counted): pairs longer than max_length keep their start
(the completion's end is cut); pairs whose prompt alone fills max_length are dropped.
"""

from __future__ import annotations

from posttrain.data.sft_tokenize import common_prefix_length
from posttrain.errors import PosttrainError

TOKENIZE_CHUNK = 2048  # rows per batched call: the fast tokenizer keeps every Encoding of a call until it returns


def _full_ids(tokenizer, rows: list[dict]) -> list[tuple[list, list, list]]:
    """(prompt, prompt + chosen, prompt + rejected) token ids of each row, in a few batched tokenizer calls (one
    call per sequence costs ~0.1 ms of Python each, and a batch lets the Rust tokenizer use several threads)."""
    out: list = [None] * len(rows)
    plain = [i for i, row in enumerate(rows) if isinstance(row["prompt"], str)]
    chat = [i for i, row in enumerate(rows) if not isinstance(row["prompt"], str)]
    if plain:
        eos = tokenizer.eos_token
        add_eos = lambda text: text if text.endswith(eos) else text + eos  # noqa: E731
        texts = [rows[i]["prompt"] for i in plain]
        for completion in ("chosen", "rejected"):
            texts += [rows[i]["prompt"] + add_eos(rows[i][completion]) for i in plain]
        ids = tokenizer(texts)["input_ids"]
        for k, i in enumerate(plain):
            out[i] = (ids[k], ids[len(plain) + k], ids[2 * len(plain) + k])
    if chat:
        render = lambda convs, gen: tokenizer.apply_chat_template(  # noqa: E731
            convs, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]
        prompts = render([rows[i]["prompt"] for i in chat], True)
        full = render([rows[i]["prompt"] + rows[i][c] for c in ("chosen", "rejected") for i in chat], False)
        for k, i in enumerate(chat):
            out[i] = (prompts[k], full[k], full[len(chat) + k])
    return out


def _pair_ids(prompt_ids: list, chosen_ids: list, rejected_ids: list) -> dict:
    start = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return {"prompt_ids": prompt_ids[:start], "chosen_ids": chosen_ids[start:], "rejected_ids": rejected_ids[start:]}


def tokenize_pairs(tokenizer, rows, max_length: int) -> tuple[list[dict], dict]:
    """Normalized preference rows -> [{prompt_ids, chosen_ids, rejected_ids}], plus counts."""
    if rows.format != "preference":
        raise PosttrainError(f"recipe dpo needs preference rows (prompt/chosen/rejected), got {rows.format!r} rows")
    examples, counts = [], {"pairs": len(rows.rows), "truncated": 0, "prompt_too_long": 0, **rows.dropped}
    chunks = (rows.rows[i : i + TOKENIZE_CHUNK] for i in range(0, len(rows.rows), TOKENIZE_CHUNK))
    for ids in (ids for chunk in chunks for ids in _full_ids(tokenizer, chunk)):
        pair = _pair_ids(*ids)
        room = max_length - len(pair["prompt_ids"])
        if room <= 0:
            counts["prompt_too_long"] += 1
            continue
        if len(pair["chosen_ids"]) > room or len(pair["rejected_ids"]) > room:
            counts["truncated"] += 1
            pair["chosen_ids"], pair["rejected_ids"] = pair["chosen_ids"][:room], pair["rejected_ids"][:room]
        examples.append(pair)
    if not examples:
        raise PosttrainError(f"no preference pairs left: all {len(rows.rows)} prompts fill train.max_length "
                             f"({max_length}); raise it")
    return examples, counts
