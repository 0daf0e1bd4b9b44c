"""Preference rows (prompt, chosen, rejected) in the shapes public datasets use.

- explicit, plain:           {"prompt": str, "chosen": str, "rejected": str}
- explicit, conversational:  {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
- implicit prompt:           {"chosen": [msgs], "rejected": [msgs]}: the prompt is their shared prefix
- UltraFeedback style:       {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant]}:
                             the message lists repeat the prompt, so the shared prefix is the prompt.

Normalized output: {"prompt": str | [msgs], "chosen": str | [msgs], "rejected": str | [msgs]} with the prompt
removed from chosen/rejected.
"""

from __future__ import annotations

from posttrain.errors import PosttrainError


def _as_messages(value, origin: str, column: str) -> list[dict] | None:
    from posttrain.data import _kind, parse_messages

    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        raise PosttrainError(f"{origin}: column {column!r} must be a string or a list of messages, got {_kind(value)}")
    return parse_messages(value, origin, column)


def _shared_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def normalize_preference(row: dict, origin: str) -> dict:
    missing = [c for c in ("chosen", "rejected") if c not in row]
    if missing:
        raise PosttrainError(f"{origin}: missing column(s) {missing} for preference data; found {sorted(row)[:50]}")
    chosen = _as_messages(row["chosen"], origin, "chosen")
    rejected = _as_messages(row["rejected"], origin, "rejected")
    if (chosen is None) != (rejected is None):
        raise PosttrainError(f"{origin}: chosen and rejected must both be strings or both be message lists")
    prompt = row.get("prompt")
    if chosen is None:  # plain strings
        if not isinstance(prompt, str):
            raise PosttrainError(
                f"{origin}: plain-text chosen/rejected need a string 'prompt' column (implicit prompts are only "
                "taken from message lists); map yours with data.columns"
            )
        return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}
    prompt_msgs = _as_messages(prompt, origin, "prompt") if prompt is not None else None
    if prompt_msgs is not None and chosen[: len(prompt_msgs)] != prompt_msgs:
        return {"prompt": prompt_msgs, "chosen": chosen, "rejected": rejected}  # explicit, conversational
    shared = _shared_prefix(chosen, rejected)
    while shared and chosen[shared - 1]["role"] == "assistant" and shared == min(len(chosen), len(rejected)):
        shared -= 1  # identical final answers: keep them as completions so the pair is seen as identical
    if shared == 0:
        raise PosttrainError(
            f"{origin}: chosen and rejected share no prompt (their first messages differ) and no explicit "
            "'prompt' column is given; add one, or make both lists start with the same prompt messages"
        )
    if chosen[shared - 1]["role"] == "assistant" or not chosen[shared:] or not rejected[shared:]:
        raise PosttrainError(f"{origin}: after the shared prompt, chosen and rejected must each hold the answer")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def drop_identical(rows) -> None:
    """Remove pairs whose chosen equals rejected (they carry no preference); count them in rows.dropped."""
    keep = [i for i, r in enumerate(rows.rows) if r["chosen"] != r["rejected"]]
    dropped = len(rows.rows) - len(keep)
    if dropped:
        rows.dropped["identical_chosen_rejected"] = dropped
        rows.rows = [rows.rows[i] for i in keep]
        rows.origins = [rows.origins[i] for i in keep]


# ----------------------------------------------------------------------------------------------------------
# Tokenization, as TRL's DPOTrainer does it (so losses and rewards are comparable with TRL's):
# the prompt is rendered with the generation prompt; each completion is what prompt+completion adds after the
# common token prefix (for chat rows that includes the end-of-turn token and the template's newline); plain
# strings get EOS appended. Truncation policy (stated, counted): pairs longer than max_length keep their start
# (the completion's end is cut); pairs whose prompt alone fills max_length are dropped.


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
    from posttrain.masks import common_prefix_length

    start = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return {"prompt_ids": prompt_ids[:start], "chosen_ids": chosen_ids[start:], "rejected_ids": rejected_ids[start:]}


def tokenize_pairs(tokenizer, rows, max_length: int) -> tuple[list[dict], dict]:
    """Normalized preference rows -> [{prompt_ids, chosen_ids, rejected_ids}], plus counts."""
    from posttrain.errors import PosttrainError

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


def preference_examples(cfg, tokenizer) -> tuple[list[dict], list[dict] | None, dict]:
    """A run config's train/eval preference pairs, tokenized as the DPO recipe trains on them, plus the data
    counts that go into metrics.json (the preference twin of masks.sft_examples)."""
    from posttrain.data import load_splits

    train_rows, eval_rows = load_splits(cfg.data, cfg.train.seed)
    train_pairs, counts = tokenize_pairs(tokenizer, train_rows, cfg.train.max_length)
    eval_pairs = tokenize_pairs(tokenizer, eval_rows, cfg.train.max_length)[0] if eval_rows else None
    return train_pairs, eval_pairs, counts
