"""Raw rows in, normalized rows out: every dataset format becomes one of four shapes that the rest of posttrain
understands:

    chat        {"messages": [{"role", "content"}...], "train_from": i}   messages, sharegpt, alpaca, chat p/c
    completion  {"prompt": str, "completion": str}                      plain prompt_completion
    text        {"text": str}                                           raw language modelling
    preference  {"prompt": str | msgs, "chosen": str | msgs, "rejected": str | msgs}

`train_from` is the index of the first message whose assistant turns carry the loss: 0 for a conversation,
len(prompt) for a conversational prompt/completion row (TRL trains on the completion only).

Preference rows come in the shapes public datasets use:

- explicit, plain:           {"prompt": str, "chosen": str, "rejected": str}
- explicit, conversational:  {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
- implicit prompt:           {"chosen": [msgs], "rejected": [msgs]}: the prompt is their shared prefix
- UltraFeedback style:       {"prompt": str, "chosen": [user, assistant], "rejected": [user, assistant]}:
                             the message lists repeat the prompt, so the shared prefix is the prompt.

Normalized output: {"prompt": str | [msgs], "chosen": str | [msgs], "rejected": str | [msgs]} with the prompt
removed from chosen/rejected.

Missing values follow one rule whatever the file type: a null (JSON null, a parquet/Arrow null) is an empty
string, as an empty CSV cell is. A row whose part to learn (text, completion, an assistant answer, chosen or
rejected) is empty or blank is dropped and counted in Rows.dropped (which goes into metrics.json), as is a chat
row with a blank user turn; a plain-string prompt may be empty (see _empty_part).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from posttrain.config.schema import DataConfig
from posttrain.data.sources import kind_of, mix_sources
from posttrain.errors import PosttrainError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "tool": "tool"}
REQUIRED = {  # format -> columns that identify it (auto-detection checks them in this order)
    "preference": ("chosen", "rejected"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}



@dataclass
class Rows:
    """Normalized rows, where each came from, the format they were read as, and what was dropped."""

    rows: list[dict]
    origins: list[str]
    format: str
    dropped: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Formats.


def detect_format(row: dict, origin: str) -> str:
    for name, columns in REQUIRED.items():
        if all(c in row for c in columns):
            return name
    wanted = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in REQUIRED.items())
    raise PosttrainError(
        f"{origin}: cannot tell the data format from columns {sorted(row)}; formats need ({wanted}). "
        "Set data.format, or map your column names with data.columns (e.g. {prompt: question})"
    )


def _blank(value) -> bool:
    """A missing value: null, or a string of whitespace only."""
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value, origin: str, column: str) -> str:
    if value is None:  # a parquet or JSON null means what an empty CSV cell means: nothing there
        return ""
    if not isinstance(value, str):
        raise PosttrainError(f"{origin}: column {column!r} must be a string, got {kind_of(value)}")
    return value


def parse_messages(value, origin: str, column: str, role_map: dict | None = None) -> list[dict]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else kind_of(value)
        raise PosttrainError(f"{origin}: column {column!r} must be a non-empty list of messages, got {got}")
    role_key, content_key = ("from", "value") if role_map else ("role", "content")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            raise PosttrainError(f"{origin}: {column}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = message[role_key]
        allowed = role_map or {r: r for r in ROLES}
        if not isinstance(role, str) or role not in allowed:
            shown = repr(role[:100]) if isinstance(role, str) else f"({kind_of(role)})"
            raise PosttrainError(
                f"{origin}: {column}[{i}] has unknown role {shown}; allowed: {', '.join(allowed)}"
            )
        out.append({"role": allowed[role], "content": _text(message[content_key], origin, f"{column}[{i}].content")})
    return out


def normalize_row(row: dict, fmt: str, origin: str, system_prompt: str | None) -> dict:
    """One raw row in format `fmt` -> one normalized row (see the module docstring)."""
    missing = [c for c in REQUIRED[fmt] if c not in row]
    if missing:
        raise PosttrainError(f"{origin}: missing column(s) {missing} for format {fmt!r}; found {sorted(row)}")
    if fmt == "text":
        return {"text": _text(row["text"], origin, "text")}
    if fmt == "preference":
        return normalize_preference(row, origin)
    if fmt == "prompt_completion" and (row["prompt"] is None or isinstance(row["prompt"], str)):
        return {"prompt": _text(row["prompt"], origin, "prompt"), "completion": _text(row["completion"], origin,
                                                                                          "completion")}
    if fmt == "prompt_completion":
        prompt = parse_messages(row["prompt"], origin, "prompt")
        messages, train_from = prompt + parse_messages(row["completion"], origin, "completion"), len(prompt)
    elif fmt == "alpaca":
        instruction = _text(row["instruction"], origin, "instruction")
        extra = _text(row.get("input"), origin, "input")
        user = "\n\n".join(part for part in (instruction, extra) if part.strip())  # either may be left empty
        messages, train_from = [{"role": "user", "content": user},
                                {"role": "assistant", "content": _text(row["output"], origin, "output")}], 0
    elif fmt == "sharegpt":
        messages, train_from = parse_messages(row["conversations"], origin, "conversations", SHAREGPT_ROLES), 0
    else:
        messages, train_from = parse_messages(row["messages"], origin, "messages"), 0
    if system_prompt and messages[0]["role"] != "system":
        messages, train_from = [{"role": "system", "content": system_prompt}] + messages, train_from + 1
    return {"messages": messages, "train_from": train_from}


def normalize(rows: list[dict], origins: list[str], cfg: DataConfig, label: str) -> Rows:
    """Rename columns, detect the format (from the first row) and normalize every row."""
    rows = rename_columns(rows, origins, cfg, label)
    fmt = cfg.format if cfg.format != "auto" else detect_format(rows[0], origins[0])
    out, first_dropped = Rows([], [], fmt), None
    for row, origin in zip(rows, origins):
        normalized = normalize_row(row, fmt, origin, cfg.system_prompt)
        reason = _empty_part(normalized)
        if reason:
            out.dropped[reason] = out.dropped.get(reason, 0) + 1
            first_dropped = first_dropped or origin
            continue
        out.rows.append(normalized)
        out.origins.append(origin)
    if fmt == "preference":
        drop_identical(out)
    if not out.rows:
        first = f"; the first: {first_dropped}" if first_dropped else ""
        raise PosttrainError(f"data.{label}: no rows left after filtering ({out.dropped}{first}); check the data")
    return out


def rename_columns(rows: list[dict], origins: list[str], cfg: DataConfig, label: str) -> list[dict]:
    """Rows with data.columns applied (standard name <- your column); no rows, or a mapped column missing, fails."""
    if not rows:
        raise PosttrainError(f"data.{label}: the source(s) hold no rows; check the path, split and fraction")
    absent = [(ours, theirs) for ours, theirs in cfg.columns.items() if theirs not in rows[0] and ours not in rows[0]]
    if absent:
        ours, theirs = absent[0]
        raise PosttrainError(f"{origins[0]}: data.columns maps {ours!r} to column {theirs!r}, which is not there; "
                             f"its columns: {sorted(rows[0])[:50]}")
    reverse = {theirs: ours for ours, theirs in cfg.columns.items()}
    return [{reverse.get(k, k): v for k, v in row.items()} for row in rows]


def _empty_turn(messages: list[dict], trained_from: int) -> str | None:
    """'empty_answer' for a blank assistant turn that carries the loss, 'empty_prompt' for a blank user turn (or
    a blank assistant turn of the prompt's history). System and tool messages may be empty: an empty system
    prompt or an empty tool result is still a well-formed conversation."""
    for i, message in enumerate(messages):
        if message["role"] in ("user", "assistant") and _blank(message["content"]):
            return "empty_answer" if message["role"] == "assistant" and i >= trained_from else "empty_prompt"
    return None


def _empty_part(row: dict) -> str | None:
    """Why a normalized row is dropped, or None to keep it. An empty text, completion, answer, chosen or rejected
    would train the model to stop at once (or, in DPO, to prefer silence), so the row is dropped. A plain-string
    prompt may be empty: the completion (or the preferred continuation) is then learned unconditionally, as a
    text row is, and TRL tokenizes it the same way. A chat's user turn may not: a reply to nothing is no
    conversation to learn from."""
    if "text" in row:
        return "empty_text" if _blank(row["text"]) else None
    if "completion" in row:
        return "empty_completion" if _blank(row["completion"]) else None
    if "messages" in row:
        return _empty_turn(row["messages"], row["train_from"])
    for side in (row["chosen"], row["rejected"]):
        if _empty_turn(side, 0) if isinstance(side, list) else _blank(side):
            return "empty_chosen_rejected"
    return _empty_turn(row["prompt"], len(row["prompt"])) if isinstance(row["prompt"], list) else None


def load_splits(cfg: DataConfig, seed: int, normalizer=normalize) -> tuple[Rows, Rows | None]:
    """(train, eval) normalized rows. Without data.eval, hold out eval_fraction of train (seeded). normalizer:
    normalize (the training formats) or another with its signature (the RL recipe's prompt-only rows)."""
    rows, origins = mix_sources(cfg.train, seed)
    if cfg.eval:
        eval_rows, eval_origins = mix_sources(cfg.eval, seed)
        held = None
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = min(cfg.max_eval_rows, int(len(rows) * cfg.eval_fraction))
        held = order[:n_eval]
        held_origins = {origins[i] for i in held}  # a repeated row (fraction > 1) is held out with all its copies
        eval_rows, eval_origins = [rows[i] for i in held], [origins[i] for i in held]
        keep = [i for i in range(len(rows)) if origins[i] not in held_origins]
        rows, origins = [rows[i] for i in keep], [origins[i] for i in keep]
    train = normalizer(rows, origins, cfg, "train")
    if not eval_rows:
        return train, None
    if held is None:
        return train, normalizer(eval_rows, eval_origins, cfg, "eval")
    return train, normalizer(eval_rows[: cfg.max_eval_rows], eval_origins[: cfg.max_eval_rows], cfg, "eval")


# ----------------------------------------------------------------------------------------------------------
# Preference rows.


def _as_messages(value, origin: str, column: str) -> list[dict] | None:
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        raise PosttrainError(
            f"{origin}: column {column!r} must be a string or a list of messages, got {kind_of(value)}")
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
    prompt = "" if "prompt" in row and row["prompt"] is None else row.get("prompt")  # a null prompt is empty
    if _blank(row["chosen"]) or _blank(row["rejected"]):  # dropped by normalize; its shape no longer matters
        return {"prompt": "", "chosen": "", "rejected": ""}
    chosen = _as_messages(row["chosen"], origin, "chosen")
    rejected = _as_messages(row["rejected"], origin, "rejected")
    if (chosen is None) != (rejected is None):
        raise PosttrainError(f"{origin}: chosen and rejected must both be strings or both be message lists")
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
